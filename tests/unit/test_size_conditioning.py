"""SDXL size conditioning (model.size_conditioning) and sampling at any size, in one process.

The path is zero-initialised, so a U-Net with it computes what the square one does until training moves it; after
that, other sizes or crops change the output. A real (single-rank) DeepSpeed run with EMA trains two steps on
bucket-shaped batches and saves a checkpoint through the trainer's own store; from it, load_trained, ldmscale-sample
(any canvas, --original-size/--crop/--target-size) and ldmscale-export (the conditioning baked into a plain
StableDiffusionPipeline U-Net) must all see the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from ldmscale.checkpoint import CheckpointStore, load_trained
from ldmscale.config import ConfigError, dump_config, load_config
from ldmscale.config.presets import UNET_PRESETS
from ldmscale.data.buckets import SizeCond
from ldmscale.eval.generate import SettingsMismatch
from ldmscale.inference import export, sample
from ldmscale.inference.sizes import CanvasError
from ldmscale.models.encoders import tokenize
from ldmscale.models.size_conditioning import (
    add_size_conditioning,
    added_cond_kwargs,
    apply_size_config,
    bake_size_conditioning,
    size_cond_tensor,
)
from ldmscale.trainer.ds_config import build_ds_config
from ldmscale.trainer.ema import EMA
from ldmscale.trainer.engine import build_engine
from ldmscale.trainer.stages import build_stage
from tests.conftest import REPO, tiny_overrides

SIZE = {"model.size_conditioning": True, "model.size_embed_dim": 16}


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32,
                                **UNET_PRESETS["tiny"]).eval()


def run_unet(unet: UNet2DConditionModel, conds: list[SizeCond] | None, shape: tuple[int, int] = (6, 10)
             ) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c = unet.config
    x, ctx = torch.randn(2, c.in_channels, *shape, generator=g), torch.randn(2, 7, c.cross_attention_dim, generator=g)
    kw = {"added_cond_kwargs": added_cond_kwargs(size_cond_tensor(conds))} if conds else {}
    with torch.no_grad():
        return unet(x, torch.tensor([20, 700]), encoder_hidden_states=ctx, **kw).sample


CROPPED = SizeCond(original=(60, 100), crop=(5, 12), target=(24, 40))


# ---------------------------------------------------------------- the path itself


def test_the_zero_initialised_path_leaves_a_square_models_output_unchanged() -> None:
    unet = tiny_unet()
    before = run_unet(unet, None)
    add_size_conditioning(unet, 16)
    for conds in ([SizeCond.default(24, 40)] * 2, [CROPPED, SizeCond.default(512, 512)]):
        assert torch.equal(run_unet(unet, conds), before)


def test_once_trained_other_sizes_and_crops_change_the_output() -> None:
    unet = add_size_conditioning(tiny_unet(), 16)
    torch.nn.init.normal_(unet.add_embedding.linear_2.weight, std=0.05)  # what training does to it
    default = run_unet(unet, [SizeCond.default(24, 40)] * 2)
    for other in (CROPPED, SizeCond((12, 20), (0, 0), (24, 40)), SizeCond((24, 40), (0, 8), (24, 40))):
        assert (run_unet(unet, [other] * 2) - default).abs().max() > 1e-3
    mixed = run_unet(unet, [SizeCond.default(24, 40), CROPPED])  # per-sample rows
    assert torch.equal(mixed[0], default[0]) and not torch.allclose(mixed[1], default[1])


def test_the_path_survives_save_pretrained_and_from_config(tmp_path: Path) -> None:
    unet = add_size_conditioning(tiny_unet(), 16)
    torch.nn.init.normal_(unet.add_embedding.linear_2.weight, std=0.05)
    unet.save_pretrained(tmp_path)
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    assert again.config.addition_embed_type == "text_time"
    assert torch.equal(run_unet(again.eval(), [CROPPED] * 2), run_unet(unet, [CROPPED] * 2))


def test_baking_one_conditioning_gives_a_plain_unet_that_computes_it() -> None:
    unet = add_size_conditioning(tiny_unet(), 16)
    torch.nn.init.normal_(unet.add_embedding.linear_2.weight, std=0.05)
    plain = bake_size_conditioning(unet, CROPPED)
    assert plain.config.addition_embed_type is None and not hasattr(plain, "add_embedding")
    torch.testing.assert_close(run_unet(plain, None), run_unet(unet, [CROPPED] * 2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run_unet(plain, None), run_unet(unet, [SizeCond.default(24, 40)] * 2), atol=1e-3)


def test_a_unet_folder_disagreeing_with_the_config_is_refused() -> None:
    unet = add_size_conditioning(tiny_unet(), 16)
    assert apply_size_config(unet, True, 16) is unet  # a fine-tuned folder that has it already
    with pytest.raises(ConfigError, match="model.size_conditioning=false"):
        apply_size_config(unet, False, 16)
    with pytest.raises(ConfigError, match="model.size_embed_dim=32"):
        apply_size_config(unet, True, 32)


# ---------------------------------------------------------------- the training step


def test_a_size_conditioned_stage_starts_where_the_square_one_does(assets: Path, tmp_path: Path) -> None:
    """Same seed, same weights, same loss; the six numbers reach the U-Net and move the loss once it learned."""
    torch.manual_seed(0)  # as the trainer seeds before building the stage
    plain = build_stage(load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path)),
                        torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    sized = build_stage(load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path, **SIZE)),
                        torch.device("cpu"), torch.float32)
    batch = {"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
             "input_ids": tokenize(plain.tokenizer, ["a handwritten digit 3"] * 4), "keys": list("abcd")}
    loss_plain, _ = plain.loss(plain.module, batch, range(4), 0)
    loss_sized, _ = sized.loss(sized.module, batch, range(4), 0)
    assert torch.equal(loss_plain, loss_sized)
    assert sized.flops_per_sample() > plain.flops_per_sample() > 0  # MFU counts the added embedding too
    torch.nn.init.normal_(sized.module.unet.add_embedding.linear_2.weight, std=0.05)
    default, _ = sized.loss(sized.module, batch, range(4), 0)
    explicit, _ = sized.loss(sized.module, {**batch, "size_cond": torch.tensor([[32, 32, 0, 0, 32, 32]] * 4)},
                             range(4), 0)
    cropped, _ = sized.loss(sized.module, {**batch, "size_cond": torch.tensor([[90, 60, 0, 20, 32, 32]] * 4)},
                            range(4), 0)
    assert torch.equal(default, explicit)  # no size_cond in the batch: SDXL's default for the batch's size
    assert not torch.equal(default, cropped)


# ---------------------------------------------------------------- checkpoint, sampling, export


@pytest.fixture(scope="module")
def trained(assets: Path, single_rank_group: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two optimizer steps of a size-conditioned tiny run on bucket-shaped batches, saved as the trainer saves."""
    out = tmp_path_factory.mktemp("sized_run")
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, out, **SIZE, **{
        "data.buckets.enabled": True, "data.buckets.step": 8, "train.micro_batch_size": 8}))
    torch.manual_seed(cfg.train.seed)
    stage = build_stage(cfg, torch.device("cpu"), torch.float32)
    trainable = [(n, p) for n, p in stage.module.named_parameters() if p.requires_grad]
    ds_config = build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, 1)
    engine = build_engine(stage.module, [p for _, p in trainable], ds_config)
    ema = EMA(trainable, cfg.train.ema_decay, engine.optimizer)
    ids = tokenize(stage.tokenizer, ["a handwritten digit 3"] * 4)
    for step, (h, w) in enumerate([(24, 40), (40, 24)]):
        for micro in range(2):
            batch = {"pixels": torch.randint(0, 256, (4, 3, h, w), dtype=torch.uint8), "input_ids": ids,
                     "size_cond": torch.tensor([[2 * h, 3 * w, 0, 4 * micro, h, w]] * 4), "keys": list("abcd")}
            loss, _ = stage.loss(engine, batch, range(8 * step + 4 * micro, 8 * step + 4 * micro + 4), step)
            engine.backward(loss)
            engine.step()
        ema.update(0.5)
    CheckpointStore(out / "checkpoints", keep_last=2).save(
        engine, 2, {"step": 2, "samples_seen": 16, "world_size": 1}, ema.state_dict(), dump_config(cfg),
        rank_state={"data": {}})
    yield {"out": out, "cfg": cfg, "stage": stage, "engine": engine, "ema": ema}


@pytest.fixture(scope="module")
def run_dir(trained: dict) -> Path:
    return trained["out"]


def test_the_checkpoint_carries_the_path_in_ema_and_raw_weights(run_dir: Path) -> None:
    for weights in ("ema", "raw"):
        m = load_trained(run_dir, weights)
        assert m.unet.config.addition_embed_type == "text_time"
        assert m.unet.add_embedding.linear_2.weight.abs().max() > 0  # trained away from zero
        default, cropped = run_unet(m.unet, [SizeCond.default(24, 40)] * 2), run_unet(m.unet, [CROPPED] * 2)
        assert (default - cropped).abs().max() > 1e-4


def sample_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        sample.cli(args)
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_sample_draws_48x24_with_default_and_asked_size_conditioning(run_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    common = [str(run_dir), "--prompt", "a handwritten digit 3", "--num-images", "2", "--steps", "3",
              "--width", "48", "--height", "24"]
    code, err = sample_cli([*common, "--out", str(tmp_path / "default")], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "default" / "samples.json").read_text())
    assert [r["size_cond"] for r in records] == [[24, 48, 0, 0, 24, 48]] * 2
    images = [Image.open(tmp_path / "default" / r["file"]) for r in records]
    assert all(im.size == (48, 24) for im in images)
    code, err = sample_cli([*common, "--original-size", "96", "192", "--crop", "8", "16", "--target-size", "24", "48",
                            "--out", str(tmp_path / "asked")], capsys)
    assert code == 0, err
    asked = json.loads((tmp_path / "asked" / "samples.json").read_text())
    assert asked[0]["size_cond"] == [96, 192, 8, 16, 24, 48]
    a, b = (np.asarray(Image.open(tmp_path / d / records[0]["file"]), dtype=int) for d in ("default", "asked"))
    assert np.abs(a - b).max() > 0  # the same noise, other conditioning: another image


@pytest.mark.parametrize(("args", "message"), [
    (["--width", "50"], "--width 50: .* multiples of 8 px \\(VAE factor 4 x U-Net downsampling 2\\); try --width 48"),
    (["--height", "0"], "--height 0: "),
    (["--crop", "-1", "0"], "--crop -1 0: give pixel counts >= 0"),
])
def test_a_canvas_the_model_cannot_draw_is_one_line_exit_2(run_dir: Path, tmp_path: Path, args: list[str],
                                                          message: str, capsys: pytest.CaptureFixture) -> None:
    code, err = sample_cli([str(run_dir), "--prompt", "x", "--out", str(tmp_path), *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("ldmscale-sample: ") and __import__("re").search(message, err), err


def test_export_bakes_the_conditioning_into_a_pipeline_diffusers_runs(run_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    m = load_trained(run_dir, "ema")
    with pytest.raises(SystemExit) as exit_info:
        export.cli([str(run_dir), str(tmp_path / "pipe")])
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "pipe" / export.BAKED).read_text())["size_cond"] == [32, 32, 0, 0, 32, 32]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.unet.config.addition_embed_type is None
    torch.testing.assert_close(run_unet(pipe.unet.eval(), None, (8, 8)),
                               run_unet(m.unet, [SizeCond.default(32, 32)] * 2, (8, 8)), rtol=1e-5, atol=1e-5)
    images = pipe("a handwritten digit 3", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    # another baked conditioning, asked on the command line
    with pytest.raises(SystemExit):
        export.cli([str(run_dir), str(tmp_path / "wide"), "--original-size", "64", "128", "--target-size", "32", "32"])
    wide = UNet2DConditionModel.from_pretrained(tmp_path / "wide", subfolder="unet").eval()
    torch.testing.assert_close(run_unet(wide, None, (8, 8)),
                               run_unet(m.unet, [SizeCond((64, 128), (0, 0), (32, 32))] * 2, (8, 8)),
                               rtol=1e-5, atol=1e-5)
    # the exported pipeline has no size conditioning left to ask for
    code, err = sample_cli([str(tmp_path / "pipe"), "--prompt", "x", "--crop", "0", "4", "--out", str(tmp_path / "s")],
                           capsys)
    assert code == 2 and "was trained without model.size_conditioning; drop --crop" in err


def test_eval_draws_and_reads_references_on_the_asked_canvas(run_dir: Path, assets: Path, tmp_path: Path) -> None:
    """ldmscale-eval's pieces (the process group aside): its plan checks the canvas and conditioning, its images
    and its reference images come at that canvas."""
    from ldmscale.eval.cli import parse_args, plan
    from ldmscale.eval.generate import check_settings, draw_missing, image_path
    from ldmscale.eval.reference import rank_batches

    (tmp_path / "prompts.txt").write_text("a handwritten digit 3\na handwritten digit 7\n")
    out = tmp_path / "eval"
    a = parse_args([str(run_dir), "--prompts", str(tmp_path / "prompts.txt"), "--reference",
                    str(assets / "digits/heldout"), "--features", "pixels:4", "--width", "48", "--height", "24",
                    "--crop", "0", "8", "--steps", "2", "--out", str(out)])
    p = plan(a, 1)
    assert p.settings is not None
    assert (p.settings.height, p.settings.width, p.settings.size_cond) == (24, 48, [24, 48, 0, 8, 24, 48])
    assert draw_missing(load_trained(run_dir), p.prompts, [0, 1], out, 2.0, p.settings, 2) == 2
    assert Image.open(image_path(out, 2.0, 1)).size == (48, 24)
    assert next(rank_batches(str(assets / "digits/heldout"), (24, 48), 0, 1, 4)).shape == (4, 3, 24, 48)
    with pytest.raises(CanvasError, match="--width 41: .* try --width 40"):  # before any process group
        plan(parse_args([str(run_dir), "--prompts", str(tmp_path / "prompts.txt"), "--reference",
                         str(assets / "digits/heldout"), "--features", "pixels:4", "--width", "41",
                         "--out", str(tmp_path / "e2")]), 1)
    # a folder drawn before canvases had two sides holds square images: they still count for a square canvas
    square = replace(p.settings, height=32, width=32, size_cond=None)
    old = {k: v for k, v in asdict(square).items() if k not in ("height", "width", "size_cond")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "generation.json").write_text(json.dumps({**old, "resolution": 32}))
    check_settings(tmp_path / "old", square)
    with pytest.raises(SettingsMismatch):
        check_settings(tmp_path / "old", p.settings)


def test_in_training_grids_draw_every_prompt_on_the_tallest_square_and_widest_bucket(trained: dict,
                                                                                     tmp_path: Path) -> None:
    from ldmscale.trainer.monitor import Monitor

    stage, cfg = trained["stage"], trained["cfg"]
    stage.sample_grid(trained["engine"], trained["ema"], Monitor(cfg, tmp_path, True), tmp_path, 2)
    folder = tmp_path / "samples" / "step_00000002"
    records = json.loads((folder / "samples.json").read_text())
    sizes = [Image.open(folder / r["file"]).size for r in records]
    per_canvas = len(cfg.sample.prompts) * cfg.sample.images_per_prompt
    assert sizes == [(24, 40)] * per_canvas + [(32, 32)] * per_canvas + [(40, 24)] * per_canvas  # (w, h)
    assert records[0]["prompt"] == "a handwritten digit 3 [24x40]"
    assert (folder / "grid.png").exists()


def test_the_validation_loss_scores_a_size_conditioned_model(trained: dict, assets: Path) -> None:
    from ldmscale.eval.validation import Validator, load_validation_set, read_validation_samples

    stage, cfg = trained["stage"], trained["cfg"]
    samples = read_validation_samples([str(assets / "digits/heldout")], {}, 8)
    vset = load_validation_set(samples, stage.tokenizer, 32, True, 0, 1)
    v = Validator(vset, stage.encoders, stage.latent_shape, cfg.model.num_train_timesteps, 0, 4, 1,
                  torch.device("cpu"))
    metrics = v.run(trained["engine"].module)  # the U-Net refuses a forward without its six numbers
    assert all(np.isfinite(x) for x in metrics.values())
