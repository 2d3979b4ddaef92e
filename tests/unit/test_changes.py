from deployline.changes import classify

GLOBS = ["infrastructure/**", "*.pkr.hcl"]


def test_application_only():
    result = classify(["src/app.py", "README.md"], GLOBS)
    assert result.kind == "application" and result.build and not result.bake


def test_infrastructure_only():
    result = classify(["infrastructure/provision.sh", "images/base.pkr.hcl"], GLOBS)
    assert result.kind == "infrastructure" and result.bake and not result.build
    assert result.infrastructure_paths == ["infrastructure/provision.sh", "images/base.pkr.hcl"]


def test_both():
    result = classify(["infrastructure/provision.sh", "src/app.py"], GLOBS)
    assert result.kind == "both" and result.bake and result.build
    assert result.application_paths == ["src/app.py"]


def test_nothing_changed():
    result = classify([], GLOBS)
    assert result.kind == "none" and not result.bake and not result.build


def test_globs_are_anchored_like_gitignore():
    # "infrastructure/**" is the top-level folder only when written with a leading slash
    assert classify(["src/infrastructure/x.py"], ["/infrastructure/**"]).kind == "application"
    assert classify(["infrastructure/x.py"], ["/infrastructure/**"]).kind == "infrastructure"
