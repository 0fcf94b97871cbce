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


def test_every_console_file_is_package_data() -> None:
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["api"]
    files = [p.relative_to(CONSOLE_DIR.parent).as_posix() for p in CONSOLE_DIR.rglob("*")
             if p.is_file()]
    assert {"console/index.html", "console/console.js", "console/vendor/uPlot.LICENSE"} <= set(files)
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert missing == [], f"add these to [tool.setuptools.package-data] api: {missing}"
