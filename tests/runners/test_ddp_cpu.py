"""Lightning DDP on the CPU: runners/train.py with trainer.devices=2 trainer.strategy=ddp (two
processes, gloo), for the CPU backend (loader threads and DataLoader worker processes) and for
DALI on the CPU. Every training sample is seen
exactly once per epoch across the ranks, the ranks get the same number of batches, only rank 0
reports, and the validation metrics equal a single-process runners/test.py on the same
checkpoint and data (the val split has an odd size: one rank's shard is padded with a
duplicate, which the module's image-name de-duplication must drop)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.data.synthetic import generate_dataset
from ocr.training import run

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # starts runner processes or trains: -m 'not slow' skips it
NUM_TRAIN, NUM_VAL, EPOCHS = 8, 5, 2

# The real runner, with one callback more: each rank writes the names of the batches it
# trained and validated on. Lightning launches rank 1 by running this same script again.
RECORDING_RUNNER = f"""
import json
from pathlib import Path

import lightning as L

import ocr.training.run as run


class SeenNames(L.Callback):
    def __init__(self, folder):
        self.path = Path(folder)
        self.seen = {{"train": {{}}, "val": {{}}}}

    def _add(self, stage, trainer, batch):
        self.seen[stage].setdefault(str(trainer.current_epoch), []).append(list(batch["names"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._add("train", trainer, batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._add("val", trainer, batch)

    def on_fit_end(self, trainer, pl_module):
        (self.path / f"seen_rank{{trainer.global_rank}}.json").write_text(json.dumps(self.seen))


build_trainer = run.build_trainer
run.build_trainer = lambda cfg, output_dir, precision, callbacks, *args, **kwargs: build_trainer(
    cfg, output_dir, precision, [*callbacks, SeenNames(output_dir)], *args, **kwargs)
# not runpy.run_path: it sets sys.argv[0] to the runner, which Lightning would launch as rank 1;
# guarded: DataLoader workers (forkserver) import this script as __mp_main__
if __name__ == "__main__":
    path = {str(REPO / "runners" / "train.py")!r}
    exec(compile(Path(path).read_text(), path, "exec"), {{"__name__": "__main__", "__file__": path}})
"""

COMMON = [
    "data.image_size=64", "data.train_crop_size=64", "data.targets.min_text_size=3", "loader.batch_size=2",
    "loader.eval_batch_size=2", "loader.num_workers=1", "loader.dali_threads=1", "model.eval_workers=0",
    "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false", "seed=42",
]
# the CPU backend's two loaders: threads (its default on the CPU) and DataLoader worker processes
# (its default next to a GPU), each with the validation batch cache and map filler wrapped around it
BACKENDS = {"cpu": ["loader.backend=cpu", "loader.cpu_loader=threads"],
            "cpu-processes": ["loader.backend=cpu", "loader.cpu_loader=processes"],
            "dali": ["loader.backend=dali", "loader.device=cpu"]}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "receipts"
    generate_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, num_test=1, seed=5, progress=False)
    return root


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_two_process_ddp_sees_each_sample_once_and_scores_like_one_process(backend, tiny_root, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    script = tmp_path / "train_recording.py"
    script.write_text(RECORDING_RUNNER)
    out = tmp_path / "ddp"
    command = [sys.executable, str(script), f"data.root={tiny_root}", f"hydra.run.dir={out}", "exp_name=ddp",
               f"trainer.max_epochs={EPOCHS}", "trainer.devices=2", "trainer.strategy=ddp", *BACKENDS[backend], *COMMON]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]

    seen = [json.loads((out / f"seen_rank{rank}.json").read_text()) for rank in (0, 1)]
    train_names = sorted(p.name for p in (tiny_root / "images" / "train").iterdir())
    val_names = sorted(p.name for p in (tiny_root / "images" / "val").iterdir())
    for epoch in map(str, range(EPOCHS)):
        per_rank = [[n for batch in s["train"][epoch] for n in batch] for s in seen]
        assert [len(s["train"][epoch]) for s in seen] == [2, 2]  # 8 samples, 2 ranks, batches of 2
        assert sorted(per_rank[0] + per_rank[1]) == train_names, epoch  # each sample once, across the ranks
        val = [[n for batch in s["val"][epoch] for n in batch] for s in seen]
        assert [len(v) for v in val] == [3, 3]  # 5 images: rank 1's shard is padded with a duplicate
        assert sorted(set(val[0] + val[1])) == val_names
    first = [n for batch in seen[0]["train"]["0"] + seen[1]["train"]["0"] for n in batch]
    second = [n for batch in seen[0]["train"]["1"] + seen[1]["train"]["1"] for n in batch]
    assert first != second  # shuffled anew each epoch

    # rank 0 alone reports: one line per epoch, one result, one summary with its own share
    log = proc.stdout + proc.stderr
    assert [len(re.findall(rf"\] - Epoch {e}: ", log)) for e in range(EPOCHS)] == [1] * EPOCHS, log[-3000:]
    assert log.count('{"result": ') == 1 and log.count("Final validation:") == 1
    assert "sync_dist=True" not in log  # Lightning's warning for an epoch value left rank-local
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["epochs"]) == EPOCHS
    assert summary["epochs"][0]["train_images"] == NUM_TRAIN // 2 and summary["epochs"][0]["val_images"] == 3

    # the DDP run's last validation equals one process scoring the checkpoint it wrote (what
    # runners/test.py runs, in this process: one interpreter start less)
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="test", overrides=[
            f"data.root={tiny_root}", f"output_dir={tmp_path / 'test'}", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
            "split=val", "trainer.devices=1", *BACKENDS[backend], *COMMON])
    single = run.test(cfg)
    assert single == summary["final_metrics"]["val"]
    assert single["cleval"]["recall"] > 0  # the comparison is about detected words, not two empty results
