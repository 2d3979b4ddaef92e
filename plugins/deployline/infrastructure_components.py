"""The support infrastructure's components, in launch order: all the stage-0 DAG needs at parse time
(deployline.infrastructure, which does the work, is imported by its tasks)."""

COMPONENTS = ("network", "artifact_store", "notifications", "ci_environment")
