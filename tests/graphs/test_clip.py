"""CLIP and SigLIP: the kiln references vs transformers' CLIPModel / SiglipModel, the export graphs, save_pretrained
round trips, config reading (transformers' defaults, legacy keys) and config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.errors import CheckpointError, ConfigError, InputError
from kiln.graphs import registry
from kiln.graphs.checkpoint import from_pretrained
from kiln.graphs.clip.config import CLIPConfig
from kiln.graphs.siglip.config import SiglipConfig

TASK = "zero-shot-image-classification"
VOCAB, EOS, PAD = 99, 50, 1  # CLIP's EOS mid-vocabulary, so that "first EOS" and "highest id" pool differently
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=16)
VISION = dict(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37)  # 25 patches
CLIP_TEXT = dict(TEXT, bos_token_id=EOS - 1, eos_token_id=EOS, pad_token_id=PAD)
LEGACY_TEXT = dict(TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # configs before transformers 4.31
SIGLIP_TEXT = dict(TEXT, bos_token_id=None, eos_token_id=VOCAB - 1, pad_token_id=PAD)


def make_checkpoint(path, family: str, seed: int = 0, text=None, vision=None, **top):
    """Save a tiny random CLIPModel / SiglipModel with every weight away from its init value; returns (path,
    transformers model loaded back with eager attention, which alone returns attention probabilities)."""
    import transformers

    torch.manual_seed(seed)
    if family == "clip":
        config = transformers.CLIPConfig(text_config=text or CLIP_TEXT, vision_config=vision or VISION,
                                         **{"projection_dim": 24, **top})
        model = transformers.CLIPModel(config)
    else:
        config = transformers.SiglipConfig(text_config=text or SIGLIP_TEXT, vision_config=vision or VISION, **top)
        model = transformers.SiglipModel(config)
    with torch.no_grad():  # init leaves norms at identity and most biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or name.endswith("probe"):
                p.add_(torch.randn_like(p) * 0.1)
        model.logit_scale.fill_(math.log(10.0))
        if family == "siglip":
            model.logit_bias.fill_(-3.0)
    model.eval().save_pretrained(path)
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    return path, cls.from_pretrained(str(path), attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def dual_checkpoints(tmp_path_factory):
    """Lazily built tiny checkpoints: "clip", "clip-legacy" (eos_token_id 2), "siglip"."""
    cache = {}

    def get(name: str):
        if name not in cache:
            family, text = {"clip": ("clip", CLIP_TEXT), "clip-legacy": ("clip", LEGACY_TEXT),
                            "siglip": ("siglip", SIGLIP_TEXT)}[name]
            cache[name] = make_checkpoint(tmp_path_factory.mktemp(name), family, text=text)
        return cache[name]

    return get


def clip_text(legacy: bool = False):
    """A right-padded batch, rows of 9, 5 and 7 tokens each ending in EOS. Modern: EOS is id 50 and other ids run
    above it, padding is PAD (the last row is padded with EOS, as CLIP's tokenizer does). Legacy: EOS is the highest
    id of the vocabulary, as in CLIP's, and pads too."""
    g = torch.Generator().manual_seed(1)
    eos = VOCAB - 1 if legacy else EOS
    ids = torch.randint(3, VOCAB - 1, (3, 9), generator=g)
    ids[ids == EOS] = EOS + 1
    mask = torch.ones_like(ids)
    for row, length in enumerate((9, 5, 7)):
        ids[row, length - 1] = eos
        ids[row, length:] = eos if legacy or row == 2 else PAD
        mask[row, length:] = 0
    return ids, mask


def siglip_text():
    """Full-length rows, as SigLIP's processor pads (max_length, no attention mask)."""
    return torch.randint(2, VOCAB, (3, TEXT["max_position_embeddings"]), generator=torch.Generator().manual_seed(1))


def pixels(batch: int = 2, seed: int = 0):
    return torch.randn(batch, 3, 30, 30, generator=torch.Generator().manual_seed(seed))


def close(a, b, msg, atol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=msg)


def assert_matches(ours, theirs, ids, px, mask=None):
    """Every output transformers gives, hidden states and attentions of both towers included."""
    with torch.no_grad():
        a = ours(ids, px, mask, output_hidden_states=True, output_attentions=True)
        b = theirs(input_ids=ids, pixel_values=px, attention_mask=mask, output_hidden_states=True,
                   output_attentions=True)
        towers = {"text_model_output": theirs.text_model(input_ids=ids, attention_mask=mask),
                  "vision_model_output": theirs.vision_model(pixel_values=px)}
        features = {"text": (ours.get_text_features(ids, mask), theirs.get_text_features(input_ids=ids,
                                                                                         attention_mask=mask)),
                    "image": (ours.get_image_features(px), theirs.get_image_features(pixel_values=px))}
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        close(a[name], getattr(b, name), name)
    for tower, tower_b in towers.items():
        ours_t, theirs_t = a[tower], getattr(b, tower)
        close(ours_t["last_hidden_state"], theirs_t.last_hidden_state, f"{tower}.last_hidden_state")
        # transformers 5 puts CLIP's projected features in CLIPOutput's tower outputs; the towers' own pooled
        # outputs are their models' (CLIPTextModel / CLIPVisionModel) pooler_output, which kiln returns there.
        close(ours_t["pooler_output"], tower_b.pooler_output, f"{tower}.pooler_output")
        for kind in ("hidden_states", "attentions"):
            assert len(ours_t[kind]) == len(getattr(theirs_t, kind)), f"{tower}.{kind}"
            for i, (p, q) in enumerate(zip(ours_t[kind], getattr(theirs_t, kind))):
                close(p, q, f"{tower}.{kind}.{i}")
    for name, (p, q) in features.items():
        close(p, q.pooler_output, f"get_{name}_features")
    return a


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["clip", "clip-legacy"])
def test_clip_matches_transformers(name, attn_impl, dual_checkpoints):
    path, theirs = dual_checkpoints(name)
    ours = from_pretrained(path, task=TASK, attn_impl=attn_impl)
    assert type(ours).__name__ == "CLIPModel" and ours.config.text.legacy_eos == (name == "clip-legacy")
    ids, mask = clip_text(legacy=name == "clip-legacy")
    assert_matches(ours, theirs, ids, pixels(2), mask)
    assert_matches(ours, theirs, ids[:1], pixels(3, seed=1))  # no attention mask: causal only
    with torch.no_grad():
        out = ours(ids, pixels(1), mask)
    assert "hidden_states" not in out["text_model_output"] and "attentions" not in out["vision_model_output"]
    assert out["logits_per_image"].shape == (1, 3) and out["logits_per_text"].shape == (3, 1)


def test_clip_pools_first_eos_not_highest_id(dual_checkpoints):
    """The modern config pools at the first EOS, the legacy one at the highest id: they differ on the same ids."""
    ids, mask = clip_text()
    modern = from_pretrained(dual_checkpoints("clip")[0], task=TASK)
    assert modern.text_model.pool_index(ids).tolist() == [8, 4, 6]
    assert ids.argmax(-1).tolist() != [8, 4, 6]


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_siglip_matches_transformers(attn_impl, dual_checkpoints):
    path, theirs = dual_checkpoints("siglip")
    ours = from_pretrained(path, task=TASK, attn_impl=attn_impl)
    assert type(ours).__name__ == "SiglipModel"
    assert_matches(ours, theirs, siglip_text(), pixels(2))
    ids, mask = clip_text()  # transformers' SiglipModel takes a padding mask too (bidirectional)
    assert_matches(ours, theirs, ids, pixels(3, seed=1), mask)


def test_siglip2_projection_size(tmp_path):
    """SigLIP 2 (giant) dual_checkpoints set text_config.projection_size to the vision width: the text head widens."""
    text = dict(SIGLIP_TEXT, projection_size=40)
    path, theirs = make_checkpoint(tmp_path, "siglip", seed=2, text=text, vision=dict(VISION, hidden_size=40))
    ours = from_pretrained(path, task=TASK)
    assert ours.config.text.output_size == ours.config.projection_dim == 40
    assert_matches(ours, theirs, siglip_text(), pixels(2))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_export_graphs(name, dual_checkpoints):
    """One module per graph, with the config and the count of fused attention nodes the exporter checks."""
    ours = from_pretrained(dual_checkpoints(name)[0], task=TASK)
    graphs = ours.export_graphs()
    assert set(graphs) == {"text", "vision"}
    assert graphs["text"].attention_nodes == 2 and graphs["vision"].attention_nodes == (2 if name == "clip" else 3)
    assert all(g.config is ours.config for g in graphs.values())
    px = pixels(3)
    with torch.no_grad():
        if name == "clip":
            ids, mask = clip_text()
            text = graphs["text"](ids, mask)
            close(text["text_embeds"], ours.get_text_features(ids, mask), "text_embeds", atol=0)
        else:  # transformers' SigLIP tokenizer returns a mask; its pipeline passes it on
            ids = siglip_text()
            mask = torch.ones_like(ids)
            mask[0, -3:] = 0
            text = graphs["text"](ids, mask)
            close(text["text_embeds"], ours.get_text_features(ids, mask), "text_embeds", atol=0)
        vision = graphs["vision"](px)
        close(vision["image_embeds"], ours.get_image_features(px), "image_embeds", atol=0)
        assert set(text) == {"text_embeds", "last_hidden_state"} and set(vision) == {"image_embeds",
                                                                                      "last_hidden_state"}
        assert text["text_embeds"].shape == (3, ours.config.projection_dim)
        assert vision["last_hidden_state"].shape == (3, ours.config.vision.sequence_length, 32)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_save_pretrained_round_trip(name, dual_checkpoints, tmp_path):
    """kiln -> save_pretrained -> transformers from_pretrained gives the same outputs; the files name the class."""
    import transformers

    ours = from_pretrained(dual_checkpoints(name)[0], task=TASK)
    ours.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["CLIPModel" if name == "clip" else "SiglipModel"]
    cls = transformers.CLIPModel if name == "clip" else transformers.SiglipModel
    theirs = cls.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids, mask = (clip_text() if name == "clip" else (siglip_text(), None))
    assert_matches(ours, theirs, ids, pixels(2), mask)
    original = load_file(dual_checkpoints(name)[0] / "model.safetensors")
    assert set(load_file(tmp_path / "model.safetensors")) == set(original)


def test_config_built_in_code_saves_loadable(tmp_path):
    """A config made in code (no config.json read) still writes text_config / vision_config as transformers
    spells them."""
    import transformers

    from kiln.graphs.clip.config import CLIPTextConfig, CLIPVisionConfig
    from kiln.graphs.clip.model_torch import CLIPModel

    config = CLIPConfig(text=CLIPTextConfig(**TEXT), vision=CLIPVisionConfig(**{**VISION, "image_size": (30, 30),
                                                                                "patch_size": (6, 6)}),
                        projection_dim=24)
    model = CLIPModel(config)
    model.task = TASK
    model.save_pretrained(tmp_path)
    theirs = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        close(model.get_image_features(pixels(1)), theirs.get_image_features(pixel_values=pixels(1)).pooler_output,
              "image features")


def test_weights_round_trip_and_names(dual_checkpoints, tmp_path):
    """The key tables are one for one and keep order (errors name tensors by zipping them); old position_ids
    buffers are ignored, unknown tensors reported, a missing bare or fused parameter named as transformers names
    it."""
    from kiln.graphs.clip import weights as clip_weights
    from kiln.graphs.siglip import weights as siglip_weights

    for name, weights, config_cls in (("clip", clip_weights, CLIPConfig), ("siglip", siglip_weights, SiglipConfig)):
        path = dual_checkpoints(name)[0]
        hf = load_file(path / "model.safetensors")
        config = config_cls.from_dict(json.loads((path / "config.json").read_text()))
        extra = {"text_model.embeddings.position_ids": torch.arange(16)[None], "surprise.weight": torch.zeros(1)}
        state, unused = weights.hf_to_kiln({**hf, **extra}, config, TASK)
        assert unused == ["surprise.weight"]
        assert list(weights.kiln_to_hf(state, config, TASK)) == list(hf)
    hf = load_file(dual_checkpoints("siglip")[0] / "model.safetensors")
    for missing in ("vision_model.head.attention.in_proj_weight", "logit_bias", "vision_model.head.probe"):
        broken = tmp_path / missing
        broken.mkdir()
        save_file({k: v for k, v in hf.items() if k != missing}, broken / "model.safetensors")
        (broken / "config.json").write_text((dual_checkpoints("siglip")[0] / "config.json").read_text())
        with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
            from_pretrained(broken, task=TASK)


def test_registry_records():
    clip = registry.architecture({"model_type": "clip"})
    siglip = registry.architecture({"model_type": "siglip"})
    assert (clip.family, clip.spec, clip.hf_class("clip", TASK)) == ("clip", "dual-encoder", "CLIPModel")
    assert (siglip.family, siglip.spec, siglip.hf_class("siglip", TASK)) == ("siglip", "dual-encoder", "SiglipModel")


def _fields(ours, theirs, names):
    for name in names:
        value = getattr(theirs, name)
        value = tuple(value) if isinstance(value, list) else value
        if name in ("image_size", "patch_size") and isinstance(value, int):
            value = (value, value)
        assert getattr(ours, name) == value, name


TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id",
               "eos_token_id")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps")


@pytest.mark.parametrize("raw", [
    {},  # everything from defaults
    {"text_config": {"hidden_size": 64, "eos_token_id": 2}, "vision_config": {"image_size": 336, "patch_size": 14},
     "projection_dim": 768, "logit_scale_init_value": 4.0},
    # transformers < 4.28: text_config_dict overrides text_config, its missing keys taken from the defaults
    {"text_config": {"hidden_size": 64, "eos_token_id": 2}, "text_config_dict": {"num_hidden_layers": 3},
     "vision_config": {"hidden_size": 64}, "vision_config_dict": {"patch_size": 16}},
])
def test_clip_config_reads_like_transformers(raw):
    import transformers

    theirs = transformers.CLIPConfig(**raw)
    ours = CLIPConfig.from_dict({"model_type": "clip", **raw})
    _fields(ours.text, theirs.text_config, TEXT_FIELDS)
    _fields(ours.vision, theirs.vision_config, VISION_FIELDS)
    _fields(ours, theirs, ("projection_dim", "logit_scale_init_value"))


@pytest.mark.parametrize("raw", [
    {},
    {"text_config": {"vocab_size": 256000, "projection_size": 1536, "hidden_size": 1152, "num_attention_heads": 16},
     "vision_config": {"hidden_size": 1536, "num_attention_heads": 16, "image_size": 256}},  # SigLIP 2 giant
])
def test_siglip_config_reads_like_transformers(raw):
    import transformers

    theirs = transformers.SiglipConfig(**raw)
    ours = SiglipConfig.from_dict({"model_type": "siglip", **raw})
    _fields(ours.text, theirs.text_config, TEXT_FIELDS)
    assert ours.text.output_size == theirs.text_config.projection_size
    _fields(ours.vision, theirs.vision_config, VISION_FIELDS + ("vision_use_head",))


@pytest.mark.parametrize("family,raw,field", [
    ("clip", {"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, "vision_config.hidden_size"),
    ("clip", {"vision_config": {"image_size": 30, "patch_size": 40}}, "vision_config.patch_size"),
    ("clip", {"vision_config": {"image_size": [30]}}, "vision_config.image_size"),
    ("clip", {"text_config": {"num_hidden_layers": 0}}, "text_config.num_hidden_layers"),
    ("clip", {"text_config": {"hidden_act": "mish"}}, "text_config.hidden_act"),
    ("clip", {"text_config": {"layer_norm_eps": 2}}, "text_config.layer_norm_eps"),
    ("clip", {"text_config": {"eos_token_id": [1, 2]}}, "text_config.eos_token_id"),
    ("clip", {"text_config": {"pad_token_id": "x"}}, "text_config.pad_token_id"),
    ("clip", {"text_config": "big"}, "text_config"),
    ("clip", {"projection_dim": 0}, "projection_dim"),
    ("clip", {"logit_scale_init_value": "hot"}, "logit_scale_init_value"),
    ("siglip", {"vision_config": {"vision_use_head": False}}, "vision_config.vision_use_head"),
    ("siglip", {"text_config": {"projection_size": 512}}, "text_config.projection_size"),
    ("siglip", {"vision_config": {"num_channels": 0}}, "vision_config.num_channels"),
])
def test_config_errors_name_the_field(family, raw, field):
    cls = CLIPConfig if family == "clip" else SiglipConfig
    with pytest.raises(ConfigError, match=f"'{field}'"):
        cls.from_dict({"model_type": family, **raw})


def test_config_error_from_checkpoint(dual_checkpoints, tmp_path):
    path = dual_checkpoints("clip")[0]
    raw = json.loads((path / "config.json").read_text())
    raw["vision_config"]["num_attention_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="'vision_config.hidden_size' \\(32\\) must be divisible"):
        from_pretrained(tmp_path, task=TASK)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_input_errors(name, dual_checkpoints):
    ours = from_pretrained(dual_checkpoints(name)[0], task=TASK)
    with pytest.raises(InputError, match="30x30"):
        ours.get_image_features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(InputError, match="at most 16"):
        ours.get_text_features(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(InputError, match="attention_mask"):
        ours.get_text_features(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
