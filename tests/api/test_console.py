"""The web console in a real browser (headless Chromium driven by Playwright) against a real
`compressor serve`: submit through the form, follow the job, plots, downloads, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from compressor.vocabulary import JOB_STAGES
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ALICE, BOB = "alice-console-key-0123456789", "bob-console-key-9876543210"
DOCS = Path(__file__).resolve().parents[2] / "docs"
ENDLESS = json.dumps({"ratio": 0.5, "finetune": {"steps": 1_000_000, "eval_every": 1000}})


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Launch Debian's Chromium (scripts/test.sh installs it); never a downloaded browser."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/test.sh` (it installs chromium) or "
                    "`apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def server(data_dir: Path) -> Iterator[ServerProcess]:
    """A `compressor serve` with two tenants and its embedded worker."""
    started = ServerProcess(
        {"COMPRESSOR_DATA_DIR": str(data_dir), "COMPRESSOR_API_KEYS": f"{ALICE},{BOB}"},
        data_dir.parent / "serve.log", api_key=ALICE,
    )
    try:
        started.wait_ready()
        yield started
    finally:
        if started.process.poll() is None:
            started.stop()


def use_key(page, key: str) -> None:  # noqa: ANN001 (a Playwright page)
    """Enter the API key in the console's header form."""
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")


def screenshot(page, name: str, tmp_path: Path) -> None:  # noqa: ANN001
    """Save a screenshot; into docs/ too when COMPRESSOR_TEST_UPDATE_SCREENSHOTS is set."""
    target = tmp_path / name
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    if os.environ.get("COMPRESSOR_TEST_UPDATE_SCREENSHOTS"):
        shutil.copy(target, DOCS / name)


def test_console_submits_follows_plots_downloads_and_refuses(
    browser, server: ServerProcess, mlp_pt2: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the cancel and delete confirmations
    missing: list[str] = []  # every 404 the page meets (the favicon, a starting job's log, ...)
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    uploads: list[str] = []
    page.on("request", lambda r: uploads.append(r.url) if r.method == "POST" and r.url.endswith(
        "/v1/jobs") else None)
    response = page.goto(server.client.base_url.join("/").__str__())
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    use_key(page, ALICE)

    # A refused config: the server's message appears next to the field as it is typed, and
    # submitting uploads nothing. The method is chosen from the registry's names.
    page.goto(f"{server.client.base_url}/#/submit")
    expect(page.locator('[id="cfg-method.name"]')).to_be_visible()  # the defaults have loaded
    methods = page.locator('[id="cfg-method.name"] option').all_text_contents()
    assert methods == ["lowrank", "share_values", "tie_inputs", "tie_rows"]
    steps = page.locator('[id="cfg-finetune.steps"]')
    expect(steps).to_have_value("300")  # the defaults are shown
    steps.fill("-1")
    field_error = page.locator('.field[data-field="finetune.steps"] .field-error')
    expect(field_error).to_contain_text("greater than or equal to 0")
    page.set_input_files("#model-file", str(mlp_pt2))
    page.click("#submit-job")
    expect(page.locator("#submit-refused")).to_contain_text("nothing was uploaded")
    expect(field_error).to_contain_text("greater than or equal to 0")
    assert uploads == []

    # A tiny job through the form, followed to the end: `ratio` typed at its default value
    # is sent, and sizes the job (target mode otherwise).
    page.locator('[id="cfg-ratio"]').fill("0.5")
    steps.fill("30")
    page.locator('[id="cfg-finetune.eval_every"]').fill("5")
    page.locator('[id="cfg-export.latency_seconds"]').fill("0.05")
    page.evaluate(  # the page moves on once the upload is done: record the bar as it fills
        """() => { const bar = document.querySelector('#upload-progress'); window.uploaded = [];
        new MutationObserver(() => window.uploaded.push(Number(bar.getAttribute('aria-valuenow'))))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']}); }"""
    )
    page.click("#submit-job")
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-f]{32}$"))
    assert page.evaluate("window.uploaded")[-1] == 100
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator('#job-head [data-status="succeeded"]')).to_be_visible(timeout=120_000)
    job = server.client.get(f"/v1/jobs/{job_id}").json()
    assert job["config"]["finetune"]["steps"] == 30  # the form sent what was typed
    assert job["config"]["ratio"] == 0.5 and job["config"]["target"] is None

    expect(page.locator("#timeline .done")).to_have_count(len(JOB_STAGES))
    # Each stage box shows when the server says the stage started, not when the page saw it.
    assert list(job["stage_times"]) == list(JOB_STAGES)
    for stage, started in job["stage_times"].items():
        box = page.locator(f'#timeline [data-stage="{stage}"]')
        assert box.get_attribute("data-started") == started
        shown = page.evaluate("(iso) => new Date(iso).toLocaleTimeString()", started)
        expect(box).to_contain_text(f"from {shown}")
    expect(page.locator("#loss-chart canvas")).to_have_count(1)
    held_out_points = len(job["report"]["finetune"]["history"])
    assert int(page.locator("#loss-chart").get_attribute("data-points") or 0) >= held_out_points
    layers = [layer["name"] for layer in job["report"]["plan"]["layers"]]
    for layer in layers:
        expect(page.locator("#plot-layers")).to_contain_text(layer)
        expect(page.locator("#plot-errors")).to_contain_text(layer)
    expect(page.locator("#plot-fidelity")).to_contain_text("cosine")
    expect(page.locator("#plot-size")).to_contain_text("ONNX file")
    expect(page.locator("#plot-size")).to_contain_text("latency batch 1")
    expect(page.locator("#job-log")).to_contain_text("succeeded")

    onnx = next(a for a in job["artifacts"] if a["name"] == "model.onnx")
    expect(page.locator("#downloads")).to_contain_text(onnx["sha256"])
    with page.expect_download() as download_info:
        page.click('button[data-artifact="model.onnx"]')
    saved = tmp_path / "downloaded.onnx"
    download_info.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == onnx["sha256"]
    expect(page.locator("#downloads .verify.ok")).to_contain_text("sha256 verified")
    screenshot(page, "console-job.png", tmp_path)

    # A long job: the loss curve grows while it fine-tunes; cancelled from its page.
    endless = server.client.post(
        "/v1/jobs", files={"model": ("m.pt2", mlp_pt2.read_bytes())}, data={"config": ENDLESS}
    ).json()["id"]
    page.goto(f"{server.client.base_url}/#/jobs/{endless}")
    expect(page.locator('#timeline [data-stage="finetuning"].current')).to_be_visible(
        timeout=60_000
    )
    page.wait_for_function(
        "() => Number(document.querySelector('#loss-chart').dataset.points || 0) >= 3",
        timeout=30_000,
    )
    page.goto(f"{server.client.base_url}/#/jobs")
    row = page.locator(f'tr[data-job="{endless}"]')
    expect(row.locator('[data-status="running"]')).to_be_visible()
    expect(row.locator(".result")).to_contain_text("finetuning")
    # The finished job reads at a glance: its model, method and size, and what it came to.
    done = page.locator(f'tr[data-job="{job_id}"]')
    expect(done.locator(".model")).to_have_text("mlp.pt2")
    expect(done.locator(".how")).to_have_text(f"lowrank · ratio {job['config']['ratio']}")
    outcome = job["report"]["outcome"]
    expect(done.locator(".result")).to_contain_text(re.compile(r"[0-9.]+× (smaller|larger)"))
    expect(done.locator(".result")).to_contain_text(
        re.compile(r"[0-9.]+×( (faster|slower)|, within timing noise)"))
    assert "size_ratio" in outcome and "speedup" in outcome
    screenshot(page, "console-jobs.png", tmp_path)
    row.locator("button.cancel").click()
    expect(row.locator('[data-status="cancelled"]')).to_be_visible(timeout=30_000)
    expect(row.locator(".result .job-error")).to_contain_text("cancelled:")
    assert missing == [], missing  # no favicon 404, no 404 for a starting job's job.log
    page.select_option("#status-filter", "succeeded")
    expect(page.locator("#jobs tbody tr")).to_have_count(1)
    expect(page.locator(f'tr[data-job="{job_id}"]')).to_be_visible()

    # Another tenant's job answers 404, in the console as in the API.
    use_key(page, BOB)
    page.goto(f"{server.client.base_url}/#/jobs/{job_id}")
    expect(page.locator("#job-error")).to_contain_text("404 not_found")

    # Delete, after the confirmation.
    use_key(page, ALICE)
    page.goto(f"{server.client.base_url}/#/jobs")
    page.select_option("#status-filter", "")
    page.locator(f'tr[data-job="{job_id}"] button.delete').click()
    expect(page.locator(f'tr[data-job="{job_id}"]')).to_have_count(0)
    assert server.client.get(f"/v1/jobs/{job_id}").status_code == 404
    context.close()


def test_a_target_jobs_page_shows_the_outcome_and_every_candidate(
    browser, server: ServerProcess, mlp_pt2: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    config = {"target": {"top1_agreement": 0.5}, "finetune": {"steps": 5},
              "export": {"latency_seconds": 0.05}}
    job_id = server.client.post(
        "/v1/jobs", files={"model": ("m.pt2", mlp_pt2.read_bytes())},
        data={"config": json.dumps(config)}).json()["id"]
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(server.client.base_url.join("/").__str__())
    use_key(page, ALICE)
    page.goto(f"{server.client.base_url}/#/jobs/{job_id}")
    expect(page.locator('#job-head [data-status="succeeded"]')).to_be_visible(timeout=180_000)
    report = server.client.get(f"/v1/jobs/{job_id}").json()["report"]
    expect(page.locator("#outcome-headline")).to_have_text(report["outcome"]["headline"])
    candidates = report["target"]["candidates"]
    expect(page.locator("#frontier circle")).to_have_count(len(candidates))
    expect(page.locator("#candidates tbody tr")).to_have_count(len(candidates))
    chosen = report["target"]["chosen"]
    key = f'{chosen["kept_fraction"]:g}-{chosen["quantize"] or "float"}'  # as JavaScript writes 1.0
    assert page.locator(f'#frontier circle[data-candidate="{key}"]').get_attribute("r") == "7"
    expect(page.locator("#frontier-baseline")).to_have_count(1)  # onnxruntime int8, beside them
    expect(page.locator("#frontier-baseline-int4")).to_have_count(1)  # and int4
    screenshot(page, "console-target.png", tmp_path)


def test_a_jobs_page_says_what_its_time_budget_cut(
    browser, server: ServerProcess, mlp_pt2: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    # 30 s: less than what export, verification and the report are kept, so no step is taken
    config = {"ratio": 0.5, "finetune": {"steps": 3}, "export": {"latency_seconds": 0},
              "max_minutes": 0.5}
    job_id = server.client.post(
        "/v1/jobs", files={"model": ("m.pt2", mlp_pt2.read_bytes())},
        data={"config": json.dumps(config)}).json()["id"]
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(server.client.base_url.join("/").__str__())
    use_key(page, ALICE)
    page.goto(f"{server.client.base_url}/#/jobs/{job_id}")
    expect(page.locator('#job-head [data-status="succeeded"]')).to_be_visible(timeout=180_000)
    expect(page.locator("#budget-cut")).to_contain_text(
        "Cut to fit max_minutes 0.5: calibration on 8 of")
    expect(page.locator("#budget-cut")).to_contain_text("fine-tuning stopped at step 0 of 3")


# Layer names as a real Hugging Face encoder has them.
HF_LAYERS = [f"model.encoder.layer.{i}.attention.self.{part}" for i in range(2)
             for part in ("query", "key", "value")]


def open_faked_job(browser, server: ServerProcess, job: dict):  # noqa: ANN001, ANN201
    """Return a page showing `job` (plain data, as the API gives it) from a route that answers
    in the API's place, with a one-line job.log."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.route(f"**/v1/jobs/{job['id']}", lambda route: route.fulfill(json=job))
    page.route(f"**/v1/jobs/{job['id']}/artifacts/job.log",
               lambda route: route.fulfill(body="[12:00:10] loading\n"))
    page.goto(server.client.base_url.join("/").__str__())
    use_key(page, ALICE)
    page.goto(f"{server.client.base_url}/#/jobs/{job['id']}")
    return page


def finished_hf_job(job_id: str) -> dict:
    """Return a succeeded job as the API answers it, shaped like a small BERT's: long layer
    names, a dense layer, a loss that stays within 0.0012..0.0021, fidelity with its kind."""
    layers = [{"name": name, "kind": "linear", "shape": [384, 384], "method": "lowrank",
               "size": 64, "size_field": "rank", "weights_before": 147456,
               "weights_after": 49152, "relative_output_error": 0.0123 + i / 1000}
              for i, name in enumerate(HF_LAYERS)]
    layers.append({"name": "model.pooler.dense", "kind": "linear", "shape": [384, 384],
                   "method": "dense", "size": None, "size_field": "rank",
                   "weights_before": 147456, "weights_after": 147456,
                   "relative_output_error": 0.0})
    figures = {"kind": "embedding", "cosine": 0.9925, "relative_l2": 0.121}
    stages = {stage: f"2025-01-01T12:00:{10 + 2 * i:02d}Z" for i, stage in enumerate(JOB_STAGES)}
    return {
        "id": job_id, "model_name": "all-MiniLM-L6-v2.zip", "status": "succeeded",
        "stage": "reporting", "progress": 1.0, "created_at": "2025-01-01T12:00:00Z",
        "started_at": "2025-01-01T12:00:10Z", "finished_at": "2025-01-01T12:00:30Z",
        "config": {"method": {"name": "lowrank"}, "ratio": 0.5, "target": None,
                   "finetune": {"steps": 40}, "export": {"form": "dense"}},
        "error": None, "artifacts": [], "attempts": 1, "retry_reason": None,
        "loss_curve": [[step, 0.0021 - step * 0.0009 / 40] for step in range(0, 41, 2)],
        "stage_times": stages,
        "report": {
            "outcome": {"headline": "the artifact is 1.98× smaller", "size_ratio": 1.98},
            "warnings": [],
            "plan": {"layers": layers, "skipped": []},
            "fidelity": {"initialization": {"output_0": {**figures, "cosine": 0.97}},
                         "final": {"output_0": figures}},
            "finetune": {"history": [{"step": 40, "loss": 0.0012, "held_out": 0.00125}]},
            "parameters": {"before": 188000, "after": 74570},
            "stage_seconds": dict.fromkeys(JOB_STAGES, 2.0),
        },
    }


def test_a_real_models_page_reads_cleanly_at_any_width(
    browser, server: ServerProcess, tmp_path: Path
) -> None:
    """The console draws a Hugging Face-sized job (served here from its JSON) legibly."""
    from playwright.sync_api import expect

    job_id = "0" * 32
    job = finished_hf_job(job_id)
    page = open_faked_job(browser, server, job)
    context = page.context
    expect(page.locator("#plot-layers")).to_be_visible()

    # The loss axis and the hover legend: labels that differ wherever the values do.
    labels = json.loads(page.locator("#loss-chart").get_attribute("data-y-labels") or "[]")
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels
    page.locator("#loss-chart .u-over").hover()
    legend = page.locator("#loss-chart .u-legend .u-value").all_text_contents()
    assert any(re.fullmatch(r"0\.00[12]\d+", value) for value in legend), legend

    # A long layer name wraps inside its column: it never overlaps its bar or its figures.
    for card in ("#plot-layers", "#plot-errors"):
        rects = page.evaluate(
            """(card) => [...document.querySelectorAll(card + ' .hbars > .label')].map((label) => {
                const box = (n) => { const r = n.getBoundingClientRect();
                    return [r.left, r.top, r.right, r.bottom]; };
                return [label.textContent, box(label), box(label.nextElementSibling),
                        box(label.nextElementSibling.nextElementSibling)]; })""",
            card,
        )
        assert len(rects) == len(HF_LAYERS) + 1
        for name, label, bars, figures in rects:
            assert name.startswith("model."), name
            for other in (bars, figures):
                apart = (label[2] <= other[0] or other[2] <= label[0]
                         or label[3] <= other[1] or other[3] <= label[1])
                assert apart, (card, name, label, other)
    layers_text = page.locator("#plot-layers").inner_text()
    assert "null" not in layers_text and "lowrank rank 64" in layers_text
    fidelity = page.locator("#plot-fidelity .hbars > .label").all_text_contents()
    assert fidelity and not any("kind" in row for row in fidelity), fidelity
    expect(page.locator("#plot-size")).to_contain_text("188 K → 74.6 K")
    # The stage boxes: the server's times, each stage's duration from the report.
    loading = page.locator('#timeline [data-stage="loading"]')
    shown = page.evaluate("(iso) => new Date(iso).toLocaleTimeString()",
                          job["stage_times"]["loading"])
    expect(loading).to_contain_text(f"from {shown}")
    expect(loading).to_contain_text("2.00 s")

    # 420 px wide: nothing runs off the side, on any page.
    page.set_viewport_size({"width": 420, "height": 900})
    for view in (f"#/jobs/{job_id}", "#/jobs", "#/submit"):
        page.goto(f"{server.client.base_url}/{view}")
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(300)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 420, (view, width)
        header = page.locator("header").bounding_box()
        assert header is not None and header["x"] + header["width"] <= 420
    context.close()


def test_a_jobs_page_says_which_candidates_the_machine_lacked_the_memory_to_score(
    browser, server: ServerProcess
) -> None:
    from playwright.sync_api import expect

    job = finished_hf_job("2" * 32)
    missing = ("the original with int8: scoring the original with int8 needs about 5.1 GiB "
               "more memory, and 3.0 GiB is available")
    job["report"]["target"] = {"not_scored": [missing]}
    page = open_faked_job(browser, server, job)
    expect(page.locator("#not-scored")).to_have_text(
        f"Not scored for lack of memory: {missing}.")
    page.context.close()


def test_a_language_models_page_shows_perplexity_on_a_scale_of_its_own(
    browser, server: ServerProcess
) -> None:
    """Perplexity of the original, the compressed model and the file, apart from the fractions."""
    from playwright.sync_api import expect

    job_id = "1" * 32
    job = finished_hf_job(job_id)
    lm = {"kind": "logits", "cosine": 0.99, "relative_l2": 0.12, "top1_agreement": 0.91,
          "perplexity": 30.52, "original_perplexity": 27.4, "next_token_agreement": 0.88,
          "kl_divergence": 0.043, "next_tokens": 5120}
    job["report"]["fidelity"] = {"initialization": {"logits": {**lm, "perplexity": 181.8}},
                                 "final": {"logits": lm},
                                 "artifact": {"logits": {**lm, "perplexity": 30.61}}}
    page = open_faked_job(browser, server, job)
    perplexity = page.locator("#plot-perplexity")
    expect(perplexity).to_contain_text("27.4")
    expect(perplexity).to_contain_text("181.8 → 30.52")
    expect(perplexity).to_contain_text("30.61")
    fractions = page.locator("#plot-fidelity > div > .hbars > .label").all_text_contents()
    assert any("next token agreement" in row for row in fractions), fractions
    assert not any("perplexity" in row or "tokens" in row for row in fractions), fractions
    page.context.close()
