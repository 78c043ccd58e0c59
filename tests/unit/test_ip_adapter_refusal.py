"""Which style models diffusers' IP-Adapter format can carry: each refusal names the setting that prevents it."""

from __future__ import annotations

import pytest

from ldmscale.config import StyleConfig
from ldmscale.inference.ip_adapter import refusal


def _clip(**kw: object) -> StyleConfig:
    return StyleConfig(enabled=True, backbone="clip", vision_model="clip", **kw)  # type: ignore[arg-type]


def test_a_clip_model_trained_with_the_defaults_exports() -> None:
    assert refusal(_clip()) is None


@pytest.mark.parametrize(("cfg", "setting"), [
    (StyleConfig(enabled=True), "style.backbone=conv"),
    (_clip(clip_head="pooled"), "style.clip_head=pooled"),
    (_clip(clip_head="pooled", colour_stats=True), "style.clip_head=pooled"),
    (_clip(global_path=True), "style.global_path=true"),
    (_clip(num_tokens=8), "style.num_tokens=8"),
])
def test_what_the_format_cannot_carry_is_refused_by_its_setting(cfg: StyleConfig, setting: str) -> None:
    reason = refusal(cfg)
    assert reason is not None and reason.startswith(setting) and "\n" not in reason
