"""Screenshots of runs in the MLflow UI, for the docs (docs/img/mlflow-*.png).

Needs a Chromium (Debian: apt-get install chromium) and Playwright's Python package
(pip install playwright; its own browser download is not needed):

    python docs/screenshots.py --mlm RUN_ID --mae RUN_ID [--mlflow http://127.0.0.1:5000]

Each picture is the run's "Model metrics" tab filtered by the MLflow UI's own search box.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

SHOTS = {  # file -> (which run, the chart filter)
    "mlflow-training.png": ("mlm", "loss|mfu|tokens_per_s|grad_norm|lr$|samples_per_s"),
    "mlflow-time-memory.png": ("mlm", "time/|memory/"),
    "mlflow-eval.png": ("mae", "eval/digits/linear_probe|eval/digits/knn/accuracy$"),
}


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlm", required=True, help="run id of the text run")
    ap.add_argument("--mae", required=True, help="run id of the image run")
    ap.add_argument("--mlflow", default="http://127.0.0.1:5000")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", default=str(Path(__file__).parent / "img"))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(args.mlflow, wait_until="load")
        time.sleep(3)
        page.get_by_text("Model training", exact=True).first.click()  # not the GenAI view
        for name, (run, query) in SHOTS.items():
            run_id = getattr(args, run)
            with urllib.request.urlopen(
                f"{args.mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}"
            ) as r:
                exp = json.load(r)["run"]["info"]["experiment_id"]
            page.goto(f"{args.mlflow}/#/experiments/{exp}/runs/{run_id}/model-metrics",
                      wait_until="load")  # fmt: skip
            time.sleep(3)
            close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
            if close.count() and close.first.is_visible():  # the assistant's side panel
                close.first.click()
            page.get_by_placeholder("Search metric charts").fill(query)
            time.sleep(6)  # charts load their histories lazily
            page.screenshot(path=str(Path(args.out) / name))
            print(Path(args.out) / name)
        browser.close()


if __name__ == "__main__":
    main()
