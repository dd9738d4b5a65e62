"""Lightning DDP on the CPU for runners/test.py and runners/predict.py (trainer.devices=2
trainer.strategy=ddp: two processes, gloo). Each rank runs its own shard of the 5 images (rank
1's is padded with a duplicate), rank 0 alone reports, and what it reports equals one process
on the same checkpoint and data: the test metrics, and one predictions file with every input
image once, in input order, with the error record of an image only rank 1 tried to decode."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ocr.config import register_configs
from ocr.training import run
from ocr.training.module import DBNetModule
from test_cleval_equality import OVERRIDES as CLEVAL_OVERRIDES, ink_detector, make_line_dataset

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # starts runner processes or trains: -m 'not slow' skips it
# a runner's command line takes the preset as a config group choice
OVERRIDES = [o.replace("data.performance_preset=", "data/performance_preset=") for o in CLEVAL_OVERRIDES]
NUM_IMAGES = 5
BROKEN = "val_0_broken.jpg"  # second in input order: rank 1's shard (ranks take every 2nd image)

# The real runner, with one callback more: each rank writes the names of the batches it ran.
# Lightning launches rank 1 by running this same script again.
RECORDING_RUNNER = """
import json
from pathlib import Path

import lightning as L

import ocr.training.run as run


class SeenNames(L.Callback):
    def __init__(self, folder):
        self.path = Path(folder)
        self.seen = []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen += batch["names"]

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen += batch["names"]

    def teardown(self, trainer, pl_module, stage):
        (self.path / f"seen_rank{{trainer.global_rank}}.json").write_text(json.dumps(self.seen))


build_trainer = run.build_trainer
run.build_trainer = lambda cfg, output_dir, precision, callbacks, *args, **kwargs: build_trainer(
    cfg, output_dir, precision, [*callbacks, SeenNames(output_dir)], *args, **kwargs)
# not runpy.run_path: it sets sys.argv[0] to the runner, which Lightning would launch as rank 1;
# guarded: DataLoader workers (forkserver) import this script as __mp_main__
if __name__ == "__main__":
    path = {runner!r}
    exec(compile(Path(path).read_text(), path, "exec"), {{"__name__": "__main__", "__file__": path}})
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A val split of 5 line images, a hand-made detector's checkpoint, and a predict folder: 4
    of the images and a JPEG of headers and end marker only (it passes the checks before the run
    and fails to decode in the loader of the rank that has it)."""
    folder = tmp_path_factory.mktemp("ddp_eval")
    root = folder / "receipts"
    make_line_dataset(root, images=NUM_IMAGES)
    cfg = _compose("test", root, folder / "unused")
    module = ink_detector(DBNetModule(OmegaConf.to_container(cfg.model, resolve=True), eval_data=run._eval_data(cfg)))
    ckpt = folder / "ink.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    inputs = folder / "inputs"
    inputs.mkdir()
    for i in range(NUM_IMAGES - 1):
        shutil.copy(root / "images" / "val" / f"val_{i}.jpg", inputs)
    jpeg = (root / "images" / "val" / "val_0.jpg").read_bytes()
    (inputs / BROKEN).write_bytes(jpeg[:jpeg.index(b"\xff\xda")] + b"\xff\xd9")  # no scan: nothing to decode
    return root, ckpt, inputs


def _compose(name: str, root: Path, output_dir: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name=name, overrides=[f"data.root={root}", *OVERRIDES, f"output_dir={output_dir}", *overrides])


def _ddp(runner: str, root: Path, out: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = tmp_path / f"{runner}_recording.py"
    script.write_text(RECORDING_RUNNER.format(runner=str(REPO / "runners" / f"{runner}.py")))
    command = [sys.executable, str(script), f"data.root={root}", f"hydra.run.dir={out}", *OVERRIDES,
               "trainer.devices=2", "trainer.strategy=ddp", *overrides]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc


def _seen(out: Path) -> list[list[str]]:
    return [json.loads((out / f"seen_rank{rank}.json").read_text()) for rank in (0, 1)]


def test_two_process_test_runner_scores_each_image_once_like_one_process(data, tmp_path):
    root, ckpt, _ = data
    out = tmp_path / "ddp"
    proc = _ddp("test", root, out, tmp_path, f"ckpt_path={ckpt}", "split=val")

    seen = _seen(out)
    assert [len(names) for names in seen] == [3, 3]  # 5 images: rank 1's shard is padded with a duplicate
    assert sorted(set(seen[0] + seen[1])) == [f"val_{i}.jpg" for i in range(NUM_IMAGES)]
    assert not set(seen[0]) & set(seen[1][:-1])  # the shards are disjoint but for the padding
    reported = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"cleval"')]
    assert len(reported) == 1  # rank 0 alone prints the result
    log = proc.stdout + proc.stderr
    assert len(re.findall(rf"val split \({NUM_IMAGES} images\): CLEval", log)) == 1, log[-3000:]

    single = run.test(_compose("test", root, tmp_path / "single", f"ckpt_path={ckpt}", "split=val"))
    assert reported[0] == single
    assert single["cleval"]["recall"] > 0  # the comparison is about detected words, not two empty results


def test_two_process_predict_runner_writes_one_file_like_one_process(data, tmp_path):
    root, ckpt, inputs = data
    out = tmp_path / "ddp"
    proc = _ddp("predict", root, out, tmp_path, f"ckpt_path={ckpt}", f"input_dir={inputs}", f"overlays={out / 'overlays'}")

    seen = _seen(out)
    assert [len(names) for names in seen] == [3, 3]
    assert BROKEN not in seen[0] + seen[1]  # rank 1 put a stand-in in its place
    assert [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"result"')] == [
        {"result": str(out / "predictions.json")}]  # rank 0 alone writes and prints it
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".json" and not p.name.startswith("seen_")) == [
        "predictions.json"]
    ddp = json.loads((out / "predictions.json").read_text())["images"]
    assert list(ddp) == sorted(p.name for p in inputs.iterdir())  # each image once, in input order
    assert ddp[BROKEN]["words"] == {} and "cannot decode image data" in ddp[BROKEN]["error"]
    assert sum(len(entry["words"]) for entry in ddp.values()) > 0
    # rank 0 alone draws the overlays, of every readable image (rank 1's shard too)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"val_{i}.jpg" for i in range(NUM_IMAGES - 1)]
    assert (proc.stdout + proc.stderr).count(f"Overlays of {NUM_IMAGES - 1} images written") == 1

    single = run.predict(_compose("predict", root, tmp_path / "single", f"ckpt_path={ckpt}", f"input_dir={inputs}"))
    assert ddp == json.loads(Path(single).read_text())["images"]
