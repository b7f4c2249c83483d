"""The flowalign Gradio demo: compare aligned models, run noise optimisation live, browse training runs.

    flowalign demo [--runs runs] [--port 7860] [--host 127.0.0.1] [--share]
    python app/app.py  (the same arguments)

UI code only: every callback is a thin wrapper around ``flowalign.app.core`` (plain functions, unit-tested), which
calls the public API. The app binds to 127.0.0.1 unless ``--host`` says otherwise; ``--share`` is never implied.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from flowalign.app import core  # noqa: E402
from flowalign.app.core import DemoError, guard  # noqa: E402

log = logging.getLogger("flowalign.app")

CSS = """
#title h1 {margin-bottom: 0}
#message, #noise_status, #run_summary {min-height: 1.6em}
.error-text {color: #b00020}
#gallery .caption-label {font-size: 0.85em}
footer {display: none !important}
"""

INTRO = ("# flowalign demo\n"
         "Text-to-image models aligned with rewards, on the shipped **ShapeWorld** model (a 2.3 M-parameter SD3 "
         "pipeline that draws coloured shapes at 32 px; images are shown enlarged). **Compare** the base with "
         "the trained weights of any run, **optimise the noise** of one prompt at inference time, or browse a "
         "**run**'s plots and report.")


def _msg(text: str | None, error: bool = False) -> str:
    if not text:
        return ""
    return f"**Error:** {text}" if error else text


def _df(headers, rows):
    import pandas as pd

    return pd.DataFrame(rows, columns=headers)


def build(demo_state: core.Demo):
    """The Blocks app (not launched)."""
    global gr  # imported here (seconds), into the module's globals: gradio resolves the gr.Request annotations there
    import gradio as gr

    tasks = core.task_names()
    first_prompts = core.task_prompts(tasks[0])
    labels = demo_state.model_labels()

    # ------------------------------------------------------------------------------ callbacks (thin)
    def on_task(task):
        prompts, err = guard(core.task_prompts, task)
        if err:
            return gr.update(choices=[], value=None), _msg(err, True)
        return gr.update(choices=prompts, value=prompts[0]), ""

    def on_pick(prompt):
        return gr.update(value=prompt) if prompt else gr.update()

    def on_rescan(selected):
        labs, keep, runs, msg = demo_state.rescan(selected)
        return gr.update(choices=labs, value=keep), gr.update(choices=labs), gr.update(choices=runs), msg

    def on_compare(prompt, seed, models, extra, steps, guidance):
        res, err = guard(demo_state.compare, prompt, seed, models, extra, steps, guidance)
        if err:
            return gr.update(), gr.update(), _msg(err, True)
        n = len(res.images)
        widths = ["34%"] + [f"{66 / n:.1f}%"] * n
        return (gr.update(value=res.images, columns=min(max(2, n), 3)),
                gr.update(value=_df(res.headers, res.rows), column_widths=widths), res.message)

    def on_noise(prompt, model, method, rewards, budget, seed, steps, guidance, request: gr.Request):
        key = getattr(request, "session_hash", None) or "default"
        job, err = guard(demo_state.start_noise, key, prompt, model, method, rewards, budget, seed, steps, guidance)
        if err:
            yield gr.update(), gr.update(), gr.update(), _msg(err, True), gr.update()
            return
        last = 0.0
        try:
            for ev in job.updates():
                now = time.perf_counter()
                if now - last < 0.15 and not job.events.empty():
                    continue  # many fast iterations: skip frames, never the last one
                last = now
                yield (core.upscale(job.base_image), core.upscale(ev.image),
                       core.curve_image(job.history, job.method), job.status(), gr.update())
        finally:
            if job.running:  # the page went away: end the job
                job.stop.set()
        job.join(5)
        if job.error or job.result is None:
            yield gr.update(), gr.update(), gr.update(), _msg(job.error or "the job ended without a result", True), \
                gr.update()
            return
        ref, _ = guard(job.base_reward)
        table, terr = guard(job.final_table)
        yield (core.upscale(job.base_image), core.upscale(job.final_image()),
               core.curve_image(job.history, job.method, ref), job.status() + (f" ({terr})" if terr else ""),
               gr.update(value=_df(*table), column_widths=["34%", "33%", "33%"]) if table else gr.update())

    def on_stop(request: gr.Request):
        key = getattr(request, "session_hash", None) or "default"
        return demo_state.stop_noise(key)

    def on_run(name):
        view, err = guard(core.run_view, demo_state.runs_dir, name)
        if err:
            return [], "", _msg(err, True)
        return view.images, view.report, view.summary

    # ------------------------------------------------------------------------------ layout
    methods = [(core.METHOD_LABELS[m], m) for m in ("best_of_n", "reno", "carinox", "fk")]
    with gr.Blocks(title="flowalign demo") as blocks:
        gr.Markdown(INTRO, elem_id="title")
        with gr.Tabs():
            # ------------------------------------------------------------------ compare
            with gr.Tab("Compare models", id="compare"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            task = gr.Dropdown(tasks, value=tasks[0], label="benchmark task (ShapeWorld test split)",
                                               elem_id="task", scale=1)
                            pick = gr.Dropdown(first_prompts, value=first_prompts[0], label="benchmark prompt",
                                               elem_id="pick", scale=2)
                        prompt = gr.Textbox(first_prompts[0], label="prompt (free text, or picked above)",
                                            elem_id="prompt", lines=1, max_lines=2)
                        with gr.Row():
                            seed = gr.Number(0, label="seed", precision=0, elem_id="seed", minimum=0)
                            steps = gr.Slider(1, 50, value=20, step=1, label="sampling steps", elem_id="steps")
                            guidance = gr.Slider(1.0, 6.0, value=2.0, step=0.5, label="guidance (CFG)",
                                                 elem_id="guidance")
                    with gr.Column(scale=2):
                        models = gr.Dropdown(labels, value=demo_state.default_models(), multiselect=True,
                                             allow_custom_value=True, label="models (base + trained runs found)",
                                             elem_id="models")
                        extra = gr.Textbox("", label="or add a run / weights directory (comma-separated)",
                                           elem_id="extra", placeholder="runs/my_run or runs/my_run/final")
                        with gr.Row():
                            rescan = gr.Button("Rescan runs", elem_id="rescan", size="sm")
                            go = gr.Button("Generate", variant="primary", elem_id="generate")
                message = gr.Markdown("", elem_id="message")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=320):
                        gallery = gr.Gallery(label="images (same seed: same starting noise)", show_label=False,
                                             columns=2, height="auto", object_fit="contain", elem_id="gallery",
                                             allow_preview=False, fit_columns=False)
                    with gr.Column(scale=3, min_width=420):
                        scores = gr.Dataframe(label="scores per image", elem_id="scores", wrap=True,
                                              interactive=False, max_height=640)

            # ------------------------------------------------------------------ noise optimisation
            with gr.Tab("Noise optimisation", id="noise"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            n_task = gr.Dropdown(tasks, value=tasks[0], label="benchmark task", elem_id="noise_task")
                            n_pick = gr.Dropdown(first_prompts, value=first_prompts[0], label="benchmark prompt",
                                                 elem_id="noise_pick", scale=2)
                        n_prompt = gr.Textbox(first_prompts[0], label="prompt", elem_id="noise_prompt",
                                              max_lines=2)
                        with gr.Row():
                            n_model = gr.Dropdown(labels, value=labels[0], label="model", elem_id="noise_model",
                                                  allow_custom_value=True)
                            method = gr.Radio(methods, value="reno", label="method", elem_id="noise_method")
                        with gr.Row():
                            n_rewards = gr.Textbox("shapeclip", label="rewards (NAME or NAME=WEIGHT, comma-separated)",
                                                   info="ReNO / CARINOX need differentiable ones (shapeclip, "
                                                        "artifact); best-of-N and FK take any (shapeworld = the "
                                                        "exact judge)", elem_id="noise_rewards")
                            budget = gr.Number(600, label="budget (NFE per prompt)", precision=0, minimum=1,
                                               elem_id="noise_budget")
                        with gr.Row():
                            n_seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="noise_seed")
                            n_steps = gr.Slider(1, 50, value=20, step=1, label="sampling steps",
                                                elem_id="noise_steps")
                            n_guid = gr.Slider(1.0, 6.0, value=2.0, step=0.5, label="guidance (CFG)",
                                               elem_id="noise_guidance")
                        with gr.Row():
                            run = gr.Button("Optimise", variant="primary", elem_id="noise_run")
                            stop = gr.Button("Stop", variant="stop", elem_id="noise_stop")
                    with gr.Column(scale=2):
                        with gr.Row():
                            n_before = gr.Image(label="base sample", elem_id="noise_before", height=220,
                                                interactive=False, buttons=["download", "fullscreen"])
                            n_image = gr.Image(label="optimised (live)", elem_id="noise_image", height=220,
                                               interactive=False, buttons=["download", "fullscreen"])
                        curve = gr.Image(label="reward curve", elem_id="noise_curve", interactive=False,
                                         buttons=["download", "fullscreen"])
                n_status = gr.Markdown("", elem_id="noise_status")
                n_table = gr.Dataframe(label="scores: base sample vs result", elem_id="noise_scores", wrap=True,
                                       interactive=False)

            # ------------------------------------------------------------------ runs
            with gr.Tab("Runs", id="runs"):
                runs = core.list_runs(demo_state.runs_dir)
                default_run = "main_s0" if "main_s0" in runs else (runs[0] if runs else None)
                with gr.Row():
                    run_pick = gr.Dropdown(runs, value=default_run, label=f"run (under {demo_state.runs_dir})",
                                           elem_id="run_pick", allow_custom_value=True, scale=3)
                    show = gr.Button("Show", elem_id="run_show", scale=1)
                run_summary = gr.Markdown("", elem_id="run_summary")
                run_gallery = gr.Gallery(label="plots and sample grids", columns=2, height=520, object_fit="contain",
                                         elem_id="run_gallery")
                gr.Markdown("### report.md")
                run_report = gr.Markdown("", elem_id="run_report")

        # ---------------------------------------------------------------------- events
        task.change(on_task, task, [pick, message])
        pick.change(on_pick, pick, prompt)
        n_task.change(on_task, n_task, [n_pick, n_status])
        n_pick.change(on_pick, n_pick, n_prompt)
        rescan.click(on_rescan, models, [models, n_model, run_pick, message])
        inputs = [prompt, seed, models, extra, steps, guidance]
        go.click(on_compare, inputs, [gallery, scores, message], concurrency_id="model", concurrency_limit=1,
                 api_name="compare")
        prompt.submit(on_compare, inputs, [gallery, scores, message], concurrency_id="model", concurrency_limit=1)
        run.click(on_noise, [n_prompt, n_model, method, n_rewards, budget, n_seed, n_steps, n_guid],
                  [n_before, n_image, curve, n_status, n_table], concurrency_id="model", concurrency_limit=1,
                  api_name="optimize")
        stop.click(on_stop, None, n_status, concurrency_limit=None, api_name="stop")
        show.click(on_run, run_pick, [run_gallery, run_report, run_summary])
        run_pick.change(on_run, run_pick, [run_gallery, run_report, run_summary])
        blocks.load(on_run, run_pick, [run_gallery, run_report, run_summary])
    return blocks


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--runs", default="runs", help="folder scanned for training runs (their final/ weights, plots, "
                                                   "report.md)")
    ap.add_argument("--model", default=core.BASE_MODEL, help="base pipeline dir, hub id, or 'shapeworld'")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--no-warm-up", action="store_true", help="do not load the base model and rewards at start")
    return ap


def launch(a, block: bool = True):
    """Build and launch the app from parsed arguments; returns the Blocks (running in the background when
    ``block`` is False)."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if not 0 < a.port < 65536:
        raise DemoError(f"--port must be between 1 and 65535, got {a.port}")
    state = core.Demo(a.runs, base=a.model)
    if not state.runs_dir.is_dir():
        print(f"flowalign demo: note: runs folder {state.runs_dir} does not exist; only the base model is listed",
              file=sys.stderr)
    if not a.no_warm_up:
        threading.Thread(target=state.warm_up, daemon=True, name="flowalign-warm-up").start()
    blocks = build(state)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"flowalign demo: warning: binding to {a.host}: anyone who can reach this machine can use the app",
              file=sys.stderr)

    import gradio as gr

    allowed = [str(state.runs_dir.resolve())] if state.runs_dir.is_dir() else []
    blocks.queue(default_concurrency_limit=1)
    blocks.launch(server_name=a.host, server_port=a.port, share=bool(a.share), prevent_thread_lock=not block,
                  allowed_paths=allowed, quiet=False, show_error=False, theme=gr.themes.Soft(), css=CSS,
                  footer_links=[])
    return blocks


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = add_arguments(argparse.ArgumentParser(prog="flowalign demo", description=__doc__.splitlines()[0]))
    a = ap.parse_args(argv)
    try:
        launch(a)
    except (DemoError, OSError) as e:
        print(f"flowalign demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
