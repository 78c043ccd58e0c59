"""The input-error contract of the console scripts, as one table: each row feeds one CLI a bad input, in
process (`cli(argv)`), and asserts exit code 2, exactly one line on stderr that names the command, no traceback,
and a keyword of the fix. A tripwire on every place where work starts (a model loading, the process group, the
latent encoder, a Slurm submission) fails a row whose check comes too late.

Checkpoints here are the small files a real one has beside its weights (config.yaml, trainer_state.json,
COMPLETE, `latest`): every check runs on those, before any weights are read. tests/integration/test_cli_inputs.py
runs a few rows through the installed console scripts.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale.config import dump_config, load_config
from tests.conftest import REPO, tiny_overrides

TINY = REPO / "configs/tiny.yaml"
CLIS = {
    "train": ("ldmscale-train", "ldmscale.trainer.cli"),
    "sample": ("ldmscale-sample", "ldmscale.inference.sample"),
    "export": ("ldmscale-export", "ldmscale.inference.export"),
    "eval": ("ldmscale-eval", "ldmscale.eval.cli"),
    "encode": ("ldmscale-encode", "ldmscale.latents.encode"),
    "launch": ("ldmscale-launch", "ldmscale.launch"),
    "ema": ("ldmscale-ema", "ldmscale.checkpoint.posthoc_cli"),
    "universal": ("ldmscale-universal", "ldmscale.checkpoint.universal_cli"),
}


def fake_run(root: Path, assets: Path, step: int = 4, ema: bool = True, complete: bool = True, **extra: object
             ) -> Path:
    """A run dir whose checkpoint has every small file of a real one; its weights files are placeholders."""
    cfg = load_config(TINY, tiny_overrides(assets, root, **extra))
    tag = root / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "config.yaml").write_text(dump_config(cfg))
    (tag / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    if ema:
        (tag / "ema.safetensors").write_bytes(b"")
    if complete:
        (tag / "COMPLETE").write_text("")
    (root / "checkpoints" / "latest").write_text(tag.name)
    return root


@pytest.fixture(scope="module")
def ctx(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths the rows name: runs, exports, prompts, images, statistics, latent sets, configs."""
    t = tmp_path_factory.mktemp("inputs")
    from ldmscale.eval.fid import GaussianStats
    from ldmscale.latents.existing import ENCODING, planned_header, record_header

    c = {"A": str(assets), "tmp": str(t), "tiny": str(TINY), "heldout": str(assets / "digits/heldout"),
         "train": str(assets / "digits/train")}
    c["run"] = str(fake_run(t / "run", assets))
    c["ckpt"] = c["run"] + "/checkpoints/step_00000004"
    c["style_run"] = str(fake_run(t / "style_run", assets, **{"style.enabled": "true"}))
    c["ae_run"] = str(fake_run(t / "ae_run", assets, **{"train.stage": "autoencoder"}))
    c["noema_run"] = str(fake_run(t / "noema_run", assets, ema=False))
    c["partial"] = str(fake_run(t / "partial_run", assets, complete=False)) + "/checkpoints/step_00000004"
    c["unfinished"] = str(fake_run(t / "unfinished_run", assets, complete=False))  # `latest` names it
    both = fake_run(t / "both", assets)
    (both / "model_index.json").write_text("{}")  # an export written into the run folder by an older version
    c["both"] = str(both)
    # a run with post-hoc EMA snapshots (train.posthoc_ema) at steps 2 and 4: tiny weights, real headers
    from ldmscale.checkpoint.posthoc_ema import SNAPSHOT_DIR, write_snapshot
    ema_run = fake_run(t / "ema_run", assets)
    (ema_run / "config.yaml").write_text((ema_run / "checkpoints/step_00000004/config.yaml").read_text())
    for step in (2, 4):
        for sigma_rel in (0.05, 0.10):
            write_snapshot(ema_run / SNAPSHOT_DIR, step, sigma_rel, {"unet.w": torch.zeros(2)})
    c["ema_run"] = str(ema_run)
    recon = t / "ema_0.10"  # what ldmscale-ema writes: EMA weights only, no DeepSpeed files
    recon.mkdir()
    (recon / "config.yaml").write_text((ema_run / "config.yaml").read_text())
    (recon / "trainer_state.json").write_text(json.dumps({"step": 4, "posthoc_ema": {"sigma_rel": 0.1}}))
    (recon / "ema.safetensors").write_bytes(b"")
    (recon / "COMPLETE").write_text("")
    c["recon"] = str(recon)
    export = t / "export"
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (export / part).mkdir(parents=True)
    shutil.copytree(assets / "models/vae", export / "vae")
    (export / "model_index.json").write_text("{}")
    (export / "unet/config.json").write_text(json.dumps({"sample_size": 8, "block_out_channels": [32, 64]}))
    (export / "ldmscale_export.json").write_text(json.dumps({"checkpoint": c["ckpt"], "step": 4, "weights": "ema"}))
    c["export"] = str(export)
    broken = t / "broken_export"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")  # a copy that stopped early
    c["broken_export"] = str(broken)
    (t / "other").mkdir()
    (t / "other/notes.txt").write_text("not an export")
    c["other"] = str(t / "other")
    # prompts, images, files
    (t / "p.txt").write_text("a handwritten digit 3\n")
    (t / "empty.txt").write_text("\n  \n")
    (t / "bad.json").write_text('["a digit", ')
    (t / "rows.json").write_text(json.dumps([{"text": "a digit"}]))
    (t / "notimg.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(t / "img.png")
    (t / "file").write_text("a file")
    # FID statistics: another feature size, no sample count, not an .npz, another --features spec
    np.savez(t / "stats9.npz", mu=np.zeros(9), sigma=np.eye(9), n=np.int64(10))
    np.savez(t / "stats_no_n.npz", mu=np.zeros(16), sigma=np.eye(16))
    (t / "garbage.npz").write_bytes(b"not a zip")
    GaussianStats(np.zeros(64), np.eye(64), 10, "pixels:8").save(t / "stats_p8.npz")
    # configs: a YAML syntax error, include given as a string, an include loop, include of another type
    (t / "bad.yaml").write_text("train:\n  max_steps: 5\n   global_batch_size: 8\n")
    (t / "base.yaml").write_text("train:\n  max_steps: abc\n")
    (t / "inc_str.yaml").write_text("include: base.yaml\n")
    (t / "loop_a.yaml").write_text("include: [loop_b.yaml]\n")
    (t / "loop_b.yaml").write_text("include: [loop_a.yaml]\n")
    (t / "inc_int.yaml").write_text("include: 3\n")
    (t / "notatar.tar").write_text("not a tar")
    # latent sets begun by other configs (what ldmscale-encode records before its first shard)
    urls = sorted(str(p) for p in (assets / "digits/train").glob("*.tar"))
    heldout = sorted(str(p) for p in (assets / "digits/heldout").glob("*.tar"))
    for name, extra in (("lat64", {"data.resolution": 64}), ("latsrc", {})):
        cfg = load_config(TINY, tiny_overrides(assets, t, **extra))
        record_header(str(t / name), planned_header(cfg, "fp16", False, heldout if name == "latsrc" else urls), {})
    other_vae = t / "vae_other"
    shutil.copytree(assets / "models/vae", other_vae)
    conf = json.loads((other_vae / "config.json").read_text())
    (other_vae / "config.json").write_text(json.dumps({**conf, "scaling_factor": 0.5}))
    c["vae_other"] = str(other_vae)
    cfg = load_config(TINY, tiny_overrides(assets, t, **{"model.vae": other_vae}))
    record_header(str(t / "latvae"), planned_header(cfg, "fp16", False, urls), {})
    (t / "latunknown").mkdir()
    (t / "latunknown/00000_stats.json").write_text("{}")
    assert (t / "lat64" / ENCODING).exists()
    return c


@pytest.fixture(autouse=True)
def tripwires(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Work that must not start before every input is checked: each raises if a row reaches it. The environment
    (world_info_from_env writes RANK, WORLD_SIZE, ...) is restored after each row."""

    def tripped(what: str):  # noqa: ANN202
        def trip(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"{what} before the bad input was refused")
        return trip

    import ldmscale.checkpoint
    import ldmscale.checkpoint.posthoc_ema
    import ldmscale.checkpoint.universal_cli
    import ldmscale.eval.cli
    import ldmscale.inference.export
    import ldmscale.latents.encode
    import ldmscale.launch
    from ldmscale.runtime import dist

    for module in (ldmscale.checkpoint, ldmscale.eval.cli, ldmscale.inference.export):
        monkeypatch.setattr(module, "load_trained", tripped("a model loaded"))
    monkeypatch.setattr(dist, "init_distributed", tripped("the process group started"))
    monkeypatch.setattr(ldmscale.checkpoint.posthoc_ema, "reconstruct", tripped("the snapshots' weights were read"))
    monkeypatch.setattr(ldmscale.latents.encode, "Encoder", tripped("the VAE loaded"))
    monkeypatch.setattr(ldmscale.launch, "build_executor", tripped("a Slurm submission started"))
    monkeypatch.setattr(ldmscale.checkpoint.universal_cli, "convert_to_universal", tripped("a conversion started"))
    saved = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def OV(**extra: object) -> list[str]:  # noqa: N802  (reads as a placeholder in the table)
    """The tiny config's overrides, as a row's placeholder: expanded with the session's assets."""
    return ["{OV}", *(f"{k}={v}" for k, v in extra.items())]


S = ["{run}", "--prompt", "a digit"]  # a valid sample command line
E = ["{run}", "--prompts", "{tmp}/p.txt", "--features", "pixels:4", "--num-images", "4", "--out", "{tmp}/eval"]
R = ["--reference", "{heldout}"]
ENC = ["--config", "{tiny}", "--out", "{tmp}/latents", *OV()]
L = ["--config", "{tiny}", *OV()]
EMA = ["{ema_run}", "--sigma-rel", "0.1", "--out"]  # a valid ldmscale-ema command line, less its output folder

# (cli, argv, keyword of the fix); item numbers are those of the bad-input list in docs/errors.md
ROWS: list[tuple[str, list[str], str]] = [
    # ldmscale-train (9)
    ("train", ["--config", "{tmp}/bad.yaml"], "not valid YAML at line 3"),
    ("train", ["--config", "{tmp}/inc_str.yaml", *OV()], "train.max_steps: expected an integer"),
    ("train", ["--config", "{tmp}/loop_a.yaml"], "includes itself"),
    ("train", ["--config", "{tmp}/inc_int.yaml"], "include: must name a YAML file"),
    ("train", ["--config", "{tmp}/missing.yaml"], "does not exist"),
    ("train", ["--config", "{tmp}"], "is a folder, not a YAML file"),
    ("train", ["--config", "{tiny}", *OV(), "--resume", "{tmp}/no/such"], "resume error: "),
    ("train", ["--config", "{tiny}", "--resume", "{run}/checkpoints/step_00000009", *OV()], "no such checkpoint"),
    ("train", ["--config", "{tiny}", "--resume", "Auto", *OV()], "--resume takes auto, never"),
    ("train", ["--config", "{tiny}", "--resume", "{partial}", *OV()], "partial checkpoint"),
    ("train", ["--config", "{tiny}", *OV(), "--resme", "never"], "unrecognized arguments: --resme"),
    ("train", ["--config", "{tiny}", *OV(), "train.max_steps"], "section.key=value"),
    ("train", ["--config", "{tiny}", *OV(**{"train.max_step": 5})], "unknown config key train.max_step"),
    ("train", ["--config", "{tiny}", *OV(**{"deepspeed.zero_stage": 5})], "choose one of"),
    ("train", ["--config", "{tiny}", *OV(**{"data.num_workers": 9}), "--resume", "never"], "data.num_workers <= "),
    ("train", ["--config", "{tiny}", *OV(**{"model.vae": "{tmp}/novae"})], "no such folder"),
    ("train", ["--config", "{tiny}", *OV(**{"train.out_dir": "{tmp}/file/run"})], "is a file, so"),
    # ldmscale-sample (4)
    ("sample", [*S, "--num-images", "0"], "--num-images: 0 is too small"),
    ("sample", [*S, "--steps", "0"], "--steps: 0 is too small"),
    ("sample", [*S, "--batch-size", "0"], "--batch-size: 0 is too small"),
    ("sample", [*S, "--seed", "x"], "--seed: invalid int value"),
    ("sample", [*S, "--guidance-scale", "nan"], "not a finite number"),
    ("sample", [*S, "--style-image", "{tmp}/img.png", "--style-scale", "inf"], "not a finite number"),
    ("sample", [*S, "--sampler", "dim"], "invalid choice: 'dim'"),
    ("sample", [*S, "--weights", "best"], "invalid choice: 'best'"),
    ("sample", [*S, "--dtype", "fp64"], "invalid choice: 'fp64'"),
    ("sample", ["--prompt", "a digit"], "the following arguments are required: checkpoint"),
    ("sample", ["{run}"], "give --prompt TEXT"),
    ("sample", ["{run}", "--prompts-file", "{tmp}/empty.txt"], "holds no prompts"),
    ("sample", ["{run}", "--prompts-file", "{tmp}/missing.txt"], "no such prompts file"),
    ("sample", ["{run}", "--prompts-file", "{tmp}/bad.json"], "cannot be read as prompts"),
    ("sample", ["{run}", "--prompts-file", "{tmp}/rows.json"], "pass --caption-column"),
    ("sample", [*S, "--style-image", "{tmp}/nope.png"], "no such file"),
    ("sample", [*S, "--style-image", "{tmp}/notimg.png"], "not an image PIL can read"),
    ("sample", [*S, "--style-scale", "2"], "give --style-image FILE too"),
    ("sample", [*S, "--style-scale-blocks", "up=1"], "per block: give --style-image FILE too"),
    ("sample", [*S, "--style-image", "{tmp}/img.png", "--style-scale-blocks", "left=1"], "--style-scale-blocks"),
    ("sample", [*S, "--style-image", "{tmp}/img.png"], "not a style-conditioned checkpoint"),
    ("sample", [*S, "--device", "gpu0"], "not a device name"),
    ("sample", [*S, "--device", "cuda:99"], "--device cuda:99: "),
    ("sample", [*S, "--out", "{tmp}/file"], "is a file"),
    ("sample", [*S, "--width", "30"], "try --width 32"),
    ("sample", [*S, "--height", "0"], "--height 0: "),
    ("sample", [*S, "--original-size", "64", "64"], "trained without model.size_conditioning"),
    ("sample", [*S, "--crop", "0"], "--crop: expected 2 arguments"),
    ("sample", [*S, "--target-size", "64", "64"], "drop --target-size"),
    ("sample", ["{broken_export}", "--prompt", "a"], "not a whole diffusers pipeline"),
    ("sample", [*S, "--out", "{tmp}/file/samples"], "is a file, so"),
    ("sample", ["{tmp}/nothing", "--prompt", "a"], "no such checkpoint"),
    ("sample", ["{partial}", "--prompt", "a"], "partial checkpoint"),
    ("sample", ["{unfinished}", "--prompt", "a"], "COMPLETE"),
    ("sample", ["{ae_run}", "--prompt", "a"], "autoencoder-stage checkpoint"),
    ("sample", ["{noema_run}", "--prompt", "a"], "pass --weights raw"),
    ("sample", ["{export}", "--prompt", "a", "--weights", "raw"], "export of the ema weights"),
    ("sample", ["{recon}", "--prompt", "a", "--weights", "raw"], "holds EMA weights only"),
    ("sample", ["{both}", "--prompt", "a"], "holds both checkpoints/ and a diffusers export"),
    # ldmscale-export (6)
    ("export", ["{run}", "{run}"], "the run's own folder"),
    ("export", ["{run}", "{run}/checkpoints/out"], "inside its checkpoints/"),
    ("export", ["{ckpt}", "{run}"], "the run's own folder"),
    ("export", ["{run}", "{tmp}/file"], "is a file"),
    ("export", ["{run}", "{tmp}/file/pipe"], "is a file, so"),
    ("export", ["{run}", "{other}"], "give a new or empty folder"),
    ("export", ["{style_run}", "{tmp}/pipe"], "style.backbone=conv"),
    ("export", ["{export}", "{tmp}/pipe"], "already an exported diffusers folder"),
    ("export", ["{noema_run}", "{tmp}/pipe"], "pass --weights raw"),
    ("export", ["{recon}", "{tmp}/pipe", "--weights", "raw"], "holds EMA weights only"),
    ("export", ["{run}"], "the following arguments are required: out"),
    ("export", ["{run}", "{tmp}/pipe", "--weights", "fp16"], "invalid choice: 'fp16'"),
    ("export", ["{run}", "{tmp}/pipe", "--original-size", "64", "64"], "trained without model.size_conditioning"),
    ("export", ["{run}", "{tmp}/pipe", "--crop", "a", "b"], "--crop: invalid int value"),
    ("export", ["{run}", "{tmp}/pipe", "--target-size", "64", "64"], "drop --target-size"),
    # ldmscale-eval (5)
    ("eval", [*E, "--reference", "{tmp}/stats9.npz"], "9 features; --features pixels:4 gives 16"),
    ("eval", [*E, "--reference", "{tmp}/stats_no_n.npz"], "no reference sample count"),
    ("eval", [*E, "--reference", "{tmp}/garbage.npz"], "not a statistics file"),
    ("eval", [*E, "--reference", "{tmp}/stats_p8.npz"], "computed with --features pixels:8"),
    ("eval", [*E, "--reference", "{tmp}/missing.npz"], "no such statistics file"),
    ("eval", [*E, "--reference", "{tmp}/stats_p8.npz", "--features", "pixels:8", "--num-reference", "5"],
     "drop --num-reference"),
    ("eval", [*E, *R, "--num-reference", "1"], "--num-reference: 1 is too small"),
    ("eval", [*E, *R, "--num-reference", "100000"], "holds only 270 images"),
    ("eval", [*E, *R, "--batch-size", "0"], "--batch-size: 0 is too small"),
    ("eval", [*E, *R, "--num-images", "0"], "--num-images: 0 is too small"),
    ("eval", [*E, *R, "--num-images", "1"], "FID needs at least 2 images"),
    ("eval", [*E, *R, "--resolution", "30"], "try --resolution 32"),
    ("eval", [*E, *R, "--width", "30"], "try --width 32"),
    ("eval", [*E, *R, "--height", "x"], "--height: invalid int value"),
    ("eval", [*E, *R, "--original-size", "64", "64"], "trained without model.size_conditioning"),
    ("eval", [*E, *R, "--crop", "0", "0"], "drop --crop"),
    ("eval", [*E, *R, "--target-size", "64"], "--target-size: expected 2 arguments"),
    ("eval", [*E, *R, "--steps", "0"], "--steps: 0 is too small"),
    ("eval", [*E, *R, "--seed", "1.5"], "--seed: invalid int value"),
    ("eval", [*E, "--reference", "s3://bucket/ref/"], "cannot list the shards"),
    ("eval", [*E, "--reference", "{tmp}/nothing"], "no .tar shards, image files or .npz"),
    ("eval", [*E, *R, "--save-reference-stats", "{tmp}/ref"], "ending in .npz"),
    ("eval", [*E, "--reference", "{tmp}/stats_p8.npz", "--features", "pixels:8", "--save-reference-stats",
              "{tmp}/r.npz"], "needs reference images"),
    ("eval", [*R, "--features", "pixels:4"], "give a CHECKPOINT to evaluate"),
    ("eval", [*R, "--features", "pixels:4", "--save-reference-stats", "{tmp}/r.npz"], "needs --resolution"),
    ("eval", [*E, *R, "--features", "pixels:x"], "pixels:N needs a positive grid size"),
    ("eval", [*E, *R, "--features", "inception:{tmp}/none.pth"], "no weights file"),
    ("eval", [*E, *R, "--guidance", "0.5"], "give scales >= 1"),
    ("eval", [*E, *R, "--guidance", "2,x"], "comma-separated numbers"),
    ("eval", [*E, *R, "--prompts", "{tmp}/missing.txt"], "no such prompts file"),
    ("eval", ["{run}", *R, "--features", "pixels:4"], "give --prompts FILE"),
    ("eval", [*E, *R, "--prompts", "{tmp}/rows.json", "--caption-column", "caption"], "pass --caption-column"),
    ("eval", [*E, *R, "--sampler", "plms"], "invalid choice: 'plms'"),
    ("eval", [*E, *R, "--weights", "x"], "invalid choice: 'x'"),
    ("eval", [*E, *R, "--dtype", "half"], "invalid choice: 'half'"),
    ("eval", [*E, *R, "--wandb-mode", "on"], "invalid choice: 'on'"),
    ("eval", [*E, *R, "--out", "{tmp}/file"], "is a file"),
    ("eval", [*E, *R, "--save-reference-stats", "{tmp}/file/r.npz"], "file is a file, not a folder"),
    ("eval", [*E, *R, "--clip-model", "{tmp}/noclip"], "no such folder"),
    ("eval", [*E, *R, "--clip-model", "{tmp}"], "not a CLIP folder"),
    ("eval", [*E, *R, "--clip-model", "openai/clip-vit-base-patch32"], "HF_HUB_OFFLINE=1 forbids the hub"),
    ("eval", E, "the following arguments are required: --reference"),
    ("eval", ["{tmp}/nothing", *E[1:], *R], "no such checkpoint"),
    ("eval", ["{ae_run}", *E[1:], *R], "autoencoder-stage checkpoint"),
    ("eval", ["{noema_run}", *E[1:], *R], "pass --weights raw"),
    ("eval", ["{export}", *E[1:], *R, "--resolution", "30"], "try --resolution 32"),
    ("eval", ["{broken_export}", *E[1:], *R], "not a whole diffusers pipeline"),
    # ldmscale-encode (1, 7)
    ("encode", [*ENC, "--batch-size", "0"], "--batch-size: 0 is too small"),
    ("encode", [*ENC, "--dtype", "fp8"], "invalid choice: 'fp8'"),
    ("encode", ["--config", "{tiny}", *OV()], "the following arguments are required: --out"),
    ("encode", [*ENC, "data.format=latents"], "data.format must be images"),
    ("encode", [*ENC, "data.shards=[{tmp}/none]"], "no shards found"),
    ("encode", [*ENC, "data.shards=[{train}/*]"], "not a .tar shard"),
    ("encode", [*ENC, "data.shards=[{tmp}/notatar.tar]"], "is not a tar file"),
    ("encode", ["--config", "{tiny}", "--out", "{train}", *OV()], "give the latent shards their own folder"),
    ("encode", ["--config", "{tiny}", "--out", "{train}/latents", *OV()], "give a folder outside it"),
    ("encode", ["--config", "{tiny}", "--out", "{tmp}/file", *OV()], "is a file"),
    ("encode", ["--config", "{tiny}", "--out", "{tmp}/file/latents", *OV()], "is a file, so"),
    ("encode", ["--config", "{tiny}", "--out", "{run}", *OV()], "is a training run"),
    ("encode", ["--config", "{tiny}", "--out", "{tmp}/lat64", *OV()], "resolution: 64 -> 32"),
    ("encode", ["--config", "{tiny}", "--out", "{tmp}/latvae", *OV()], "vae.scaling_factor: 0.5 -> 0.18215"),
    ("encode", ["--config", "{tiny}", "--out", "{tmp}/latsrc", *OV()], "source_shards differ"),
    ("encode", ["--config", "{tiny}", "--out", "{tmp}/latunknown", *OV()], "no encoding.json"),
    ("encode", [*ENC, "data.nope=1"], "unknown config key data.nope"),
    ("encode", ["--config", "{tiny}", "--out", "s3://bucket/latents", *OV(),
                "data.storage_options={{endpoint_url: 'http://127.0.0.1:1', key: k, secret: s}}"], "cannot read it"),
    ("encode", [*ENC[:4], "--text-embeddings", *OV(), "--no-progress", "--bogus"], "unrecognized arguments"),
    # ldmscale-launch (8)
    ("launch", [*L, "--max-submissions", "0"], "--max-submissions: 0 is too small"),
    ("launch", [*L, "--nodes", "0"], "--nodes: 0 is too small"),
    ("launch", [*L, "--time", "0"], "--time: 0 is too small"),
    ("launch", [*L, "--gpus-per-node", "-1"], "--gpus-per-node: -1 is too small"),
    ("launch", [*L, "--tasks-per-node", "x"], "--tasks-per-node: 'x' is not a whole number"),
    ("launch", [*L, "--cpus-per-task", "0"], "--cpus-per-task: 0 is too small"),
    ("launch", [*L, "--max-timeouts", "-1"], "--max-timeouts: -1 is too small"),
    ("launch", [*L, "--time", "1"], "--signal-delay 120 s is not shorter than --time 1 min"),
    ("launch", [*L, "--signal-delay", "3600"], "give a delay < 3600 s"),
    ("launch", [*L, "--signal-delay", "-5"], "--signal-delay: -5 is too small"),
    ("launch", [*L, "--slurm-extra", "=high"], "give KEY=VALUE"),
    ("launch", [*L, "--local", "--nodes", "2"], "needs Slurm"),
    ("launch", [*L, "--nodes", "3"], "not divisible by ranks (3)"),
    ("launch", [*L, "--local", "--tasks-per-node", "3"], "not divisible by ranks (3)"),
    ("launch", [*L, "--nodes", "2", "--gpus-per-node", "4"], "not divisible by ranks (8)"),
    ("launch", [*L, "--nodes", "2", "data.num_workers=5"], "nothing submitted: data error: 8 shards cannot feed"),
    ("launch", [*L, "deepspeed.precision=fp16"], "nothing submitted: config error: deepspeed.precision=fp16"),
    ("launch", [*L, "--log-dir", "{tmp}/file"], "--log-dir"),
    ("launch", [*L, "--log-dir", "{tmp}/file/logs"], "is a file, so"),
    ("launch", [*OV()], "the following arguments are required: --config"),
    ("launch", [*L, "--no-such-option"], "unrecognized arguments"),
    ("launch", L, "sbatch is not on PATH"),
    # ldmscale-ema
    ("ema", [*EMA[:2], "0.4", "--out", "{tmp}/ema"], "0.4 is out of range: give a value in (0, 0.28]"),
    ("ema", [*EMA[:2], "nan", "--out", "{tmp}/ema"], "--sigma-rel: 'nan' is not a finite number"),
    ("ema", ["{ema_run}", "--out", "{tmp}/ema"], "the following arguments are required: --sigma-rel"),
    ("ema", [*EMA, "{tmp}/ema", "--step", "0"], "--step: 0 is too small"),
    ("ema", [*EMA, "{tmp}/ema", "--step", "3"], "no snapshot at that step; snapshots exist at steps 2, 4"),
    ("ema", EMA, "--out: expected one argument"),
    ("ema", [*EMA, "{tmp}/file"], "is a file, not a folder"),
    ("ema", [*EMA, "{tmp}/file/ema"], "is a file, so"),
    ("ema", [*EMA, "{ema_run}/checkpoints/ema"], "the run's own folder or inside its checkpoints/"),
    ("ema", [*EMA, "{other}"], "give a new or empty folder"),
    ("ema", ["{tmp}/nothing", "--sigma-rel", "0.1", "--out", "{tmp}/ema"], "no such run folder"),
    ("ema", ["{run}", "--sigma-rel", "0.1", "--out", "{tmp}/ema"], "no posthoc_ema/ folder"),
    ("ema", ["{ema_run}/checkpoints", "--sigma-rel", "0.1", "--out", "{tmp}/ema"], "give the run's train.out_dir"),
    # train resumed with profiles its checkpoint does not hold (train.posthoc_ema)
    ("train", ["--config", "{tiny}", "--resume", "{ckpt}", *OV(**{"train.posthoc_ema.sigma_rels": "[0.05,0.1]"})],
     "saved without train.posthoc_ema"),
    # ldmscale-universal
    ("universal", ["{run}", "--workers", "-1"], "--workers: -1 is too small"),
    ("universal", ["{run}", "--workers", "x"], "--workers: 'x' is not a whole number"),
    ("universal", [], "the following arguments are required: checkpoint"),
    ("universal", ["{tmp}/nothing"], "no such checkpoint"),
    ("universal", ["{partial}"], "partial checkpoint"),
]


def expand(argv: list[str], ctx: dict[str, str], assets: Path) -> list[str]:
    out: list[str] = []
    for a in argv:
        if a == "{OV}":
            out += tiny_overrides(assets, Path(ctx["tmp"]) / "trainrun")
        else:
            out.append(a.format(**ctx))
    return out


def row_id(row: tuple[str, list[str], str]) -> str:
    return f"{row[0]}-{row[2][:40]}"


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_bad_input_is_one_line_and_exit_2(row: tuple[str, list[str], str], ctx: dict[str, str], assets: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    name, argv, keyword = row
    prog, module = CLIS[name]
    if name == "eval":  # an object store that does not answer (credentials set, so the endpoint is the problem)
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    if "sbatch" in keyword:  # no Slurm client on PATH, whatever this machine has
        monkeypatch.setenv("PATH", str(tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).cli(expand(argv, ctx, assets))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exited.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), err
    assert "Traceback" not in err
    assert keyword in lines[0], lines[0]


def test_every_flag_of_every_cli_has_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    """A flag added to a CLI without a bad-input row here fails this test (flags that take no value, and free text
    that only Slurm can judge, have nothing to refuse)."""
    free = {"--help", "--prompt", "--no-progress", "--text-embeddings", "--local", "--no-wait", "--job-name",
            "--partition", "--account", "--constraint"}
    used = {a for _, argv, _ in ROWS for a in argv if a.startswith("--")}
    for name, (_, module) in CLIS.items():
        with pytest.raises(SystemExit):
            importlib.import_module(module).parse_args(["--help"])
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))
        missing = sorted(flags - used - free)
        assert not missing, f"{name}: no bad-input row for {missing}"
