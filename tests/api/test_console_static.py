"""The console's files: served from the package with strict headers, and shipped by `pip install`."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from api.http.routes.console import CONSOLE_DIR
from compressor.config import CompressionConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_console_page_and_scripts_are_served_with_a_strict_policy(make_client) -> None:
    client = make_client(embedded_worker=False, api_keys="some-key-0123456789")
    page = client.get("/")  # the page itself needs no key; every API call it makes does
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    for src in ("/console/console.js", "/console/vendor/uPlot.iife.min.js"):
        assert f'src="{src}"' in page.text
        script = client.get(src)
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert script.headers["x-content-type-options"] == "nosniff"
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert client.get("/console/../settings.py").status_code == 404
    assert client.get("/v1/jobs").status_code == 401


def test_config_defaults_match_the_core(make_client) -> None:
    client = make_client(embedded_worker=False)
    body = client.get("/v1/config").json()
    assert body["defaults"] == CompressionConfig().to_dict()
    assert "finetune" in body["schema"]["properties"]


def test_a_config_is_validated_before_any_upload(make_client) -> None:
    client = make_client(embedded_worker=False, api_keys="some-key-0123456789")
    url = "/v1/config/validate"
    assert client.post(url, json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
    auth = {"Authorization": "Bearer some-key-0123456789"}
    good = client.post(url, json={"finetune": {"steps": 7}}, headers=auth)
    assert good.status_code == 200
    assert good.json() == CompressionConfig.model_validate({"finetune": {"steps": 7}}).to_dict()
    typo = client.post(url, json={"method": "lowrnk", "finetune": {"steps": -1}}, headers=auth)
    assert typo.status_code == 422
    error = typo.json()["error"]
    assert error["code"] == "invalid_config"
    fields = {d["field"]: d["message"] for d in error["details"]}
    assert "unknown method 'lowrnk'" in fields["method"]
    assert "greater than or equal to 0" in fields["finetune.steps"]
    huge = client.post(url, content=b" " * (300 << 10), headers=auth)
    assert huge.status_code == 413
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []  # nothing was submitted


def test_the_favicon_is_served(make_client) -> None:
    client = make_client(embedded_worker=False, api_keys="some-key-0123456789")
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.text.startswith("<svg") and 'rel="icon" href="/favicon.ico"' in client.get("/").text


def test_every_console_file_is_package_data() -> None:
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["api"]
    files = [p.relative_to(CONSOLE_DIR.parent).as_posix() for p in CONSOLE_DIR.rglob("*")
             if p.is_file()]
    assert {"console/index.html", "console/console.js", "console/vendor/uPlot.LICENSE"} <= set(files)
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert missing == [], f"add these to [tool.setuptools.package-data] api: {missing}"
