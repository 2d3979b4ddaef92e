"""Deployline: a continuous-delivery deployment pipeline for AWS applications, as Airflow DAGs."""
