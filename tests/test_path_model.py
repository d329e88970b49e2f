"""PathModel / build_path_layers: the live model of a data-flow merge.

What must hold, on tiny random models (two independent Llamas A and B, and a Qwen2):
- a model's own path at scale 1 is that model, bit for bit;
- a path that repeats a layer generates the same tokens with and without the KV cache,
  while the naive rewiring (one layer object twice, one ``layer_idx``) does not: the
  control proves the test can see the corruption it guards against;
- a scale multiplies the hidden state entering its step and nothing else;
- views share every weight with the loaded models (no copy), and switching recipes leaves
  no trace: A, B, A gives A's logits again, and every layer object stays as loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from evomerge.errors import RecipeError
from evomerge.merge.path_model import PathModel, build_path_layers, decoder_layers
from evomerge.merge.path_recipe import PathRecipe, PathStep
from evomerge.merge.sources import load_model_set
from tiny_models import build_tiny_llama

N_LAYERS = 4
PROMPT = torch.tensor([[1, 17, 42, 5, 63, 8, 29, 77, 11, 50]])


@pytest.fixture(scope="module")
def two_llamas(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two independent random tiny Llamas (same architecture and tokenizer): refs of A and B."""
    root = tmp_path_factory.mktemp("path_model")
    a = build_tiny_llama(root / "A", seed=0)
    b = build_tiny_llama(root / "B", seed=7)
    return str(a), str(b)


@pytest.fixture(scope="module")
def pm(two_llamas: tuple[str, str]) -> PathModel:
    return PathModel(load_model_set(None, list(two_llamas)))


def recipe(refs: tuple[str, str], steps: str, *, embed: int = 0, scales: dict[int, float] | None = None) -> PathRecipe:
    """``"A0 B1 A2"`` -> a PathRecipe over models (A, B); ``scales`` by position."""
    scales = scales or {}
    path = [PathStep(model=refs[ord(tok[0]) - ord("A")], layer=int(tok[1:]), scale=scales.get(i, 1.0))
            for i, tok in enumerate(steps.split())]
    return PathRecipe(models=list(refs), embed_from=refs[embed], path=path)


def own_path(refs: tuple[str, str], which: str = "A") -> PathRecipe:
    return recipe(refs, " ".join(f"{which}{i}" for i in range(N_LAYERS)), embed=ord(which) - ord("A"))


def load_plain(ref: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, use_safetensors=True).eval()


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def greedy(model: nn.Module, *, use_cache: bool, n: int = 12, ids: torch.Tensor = PROMPT) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def weight_ptrs(layer: nn.Module) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in [*layer.named_parameters(), *layer.named_buffers()]}


# -- views, on a toy layer --------------------------------------------------------------------
class ToyAttn(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.proj = nn.Linear(8, 8, bias=False)


class ToyLayer(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = ToyAttn(layer_idx)
        self.register_buffer("offset", torch.arange(8.0))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.self_attn.proj(hidden_states) + self.offset


def test_views_share_weights_and_never_touch_the_original() -> None:
    torch.manual_seed(0)
    layers = [ToyLayer(i) for i in range(2)]
    pre_hooks_before = dict(layers[1]._forward_pre_hooks)
    rec = PathRecipe(models=["T"], embed_from="T", path=[PathStep(model="T", layer=1), PathStep(model="T", layer=0),
                                                         PathStep(model="T", layer=1, scale=1.7)])
    views = build_path_layers({"T": layers}, rec)
    assert [v.layer_idx for v in views] == [0, 1, 2] and [v.self_attn.layer_idx for v in views] == [0, 1, 2]
    assert [layer.layer_idx for layer in layers] == [0, 1] and [layer.self_attn.layer_idx for layer in layers] == [0, 1]
    assert views[2].self_attn.proj.weight.data_ptr() == layers[1].self_attn.proj.weight.data_ptr()
    assert views[2].offset.data_ptr() == layers[1].offset.data_ptr()
    for v in views:  # containers are the view's own
        assert v._modules is not layers[0]._modules and v._modules is not layers[1]._modules
        assert v._forward_pre_hooks is not layers[1]._forward_pre_hooks
    assert dict(layers[1]._forward_pre_hooks) == pre_hooks_before  # the scale hook went on the view only
    views[0].self_attn = ToyAttn(5)
    assert layers[1].self_attn.layer_idx == 1
    # the scale, rounded to the stream's dtype, positional or keyword; scale 1 is the layer itself
    for dtype in (torch.float32, torch.bfloat16):
        layers_d = [layer.to(dtype) for layer in layers]
        views = build_path_layers({"T": layers_d}, rec)
        h = torch.randn(3, 8).to(dtype)
        want = layers_d[1](h * torch.tensor(1.7, dtype=dtype))
        assert torch.equal(views[2](h), want) and torch.equal(views[2](hidden_states=h), want)
        assert torch.equal(views[0](h), layers_d[1](h))


# -- identity -------------------------------------------------------------------------------
def test_own_path_is_the_model_bit_for_bit(pm: PathModel, two_llamas: tuple[str, str]) -> None:
    for which, ref in zip("AB", two_llamas):
        live = pm.apply(own_path(two_llamas, which))
        assert live is pm.models[ref]
        assert live.config.num_hidden_layers == N_LAYERS
        assert torch.equal(logits(live), logits(load_plain(ref)))


# -- KV cache with a repeated layer ------------------------------------------------------------
def test_repeated_layer_generates_the_same_with_and_without_cache(pm: PathModel, two_llamas) -> None:
    live = pm.apply(recipe(two_llamas, "A0 A1 A1 A2 A3"))
    assert live.config.num_hidden_layers == 5
    attn_idx = [layer.self_attn.layer_idx for layer in live.get_decoder().layers]
    assert attn_idx == [0, 1, 2, 3, 4]
    # the original layer A1 keeps its own index; the views share its attention weights
    a1 = pm._layers[two_llamas[0]][1]
    views = list(live.get_decoder().layers)
    assert a1.self_attn.layer_idx == 1
    assert views[1].self_attn.q_proj is views[2].self_attn.q_proj is a1.self_attn.q_proj
    with_cache = greedy(live, use_cache=True)
    without = greedy(live, use_cache=False)
    assert len(with_cache) == 12
    assert with_cache == without


def test_naive_reuse_of_one_layer_object_corrupts_the_cache(two_llamas) -> None:
    """Control: the bug the views prevent is real and visible to the test above."""
    model = load_plain(two_llamas[0])
    dec = model.get_decoder()
    own = list(dec.layers)
    dec.layers = nn.ModuleList([own[0], own[1], own[1], own[2], own[3]])  # same object twice, layer_idx 1 twice
    model.config.num_hidden_layers = 5
    without = greedy(model, use_cache=False)
    try:
        with_cache = greedy(model, use_cache=True)
    except Exception as err:  # noqa: BLE001 - a shape error is corruption as well
        with_cache = [f"raised {type(err).__name__}"]
    assert with_cache != without
    # and without the cache, naive and view paths agree: the views change the cache only
    ref_layers = build_path_layers({"A": own}, PathRecipe(models=["A"], embed_from="A", path=[
        PathStep(model="A", layer=i) for i in (0, 1, 1, 2, 3)]))
    dec.layers = nn.ModuleList(ref_layers)
    assert greedy(model, use_cache=False) == without
    assert greedy(model, use_cache=True) == without


# -- scales -------------------------------------------------------------------------------------
def test_scale_multiplies_the_hidden_state_entering_its_step(pm: PathModel, two_llamas) -> None:
    path = "A0 B1 A2 B3"
    scaled = logits(pm.apply(recipe(two_llamas, path, scales={2: 1.7})))
    plain_live = pm.apply(recipe(two_llamas, path))
    plain = logits(plain_live)
    assert not torch.allclose(scaled, plain, atol=1e-3)  # the scale does something
    # reference: the unscaled path with a hand-made hook on the original module at step 2
    original = pm._layers[two_llamas[0]][2]
    handle = original.register_forward_pre_hook(lambda m, args: (args[0] * 1.7, *args[1:]))
    try:
        # views copy their hook dicts at build time: rebuild so position 2 sees the manual hook
        ref = logits(pm.apply(recipe(two_llamas, path)))
    finally:
        handle.remove()
    torch.testing.assert_close(scaled, ref, rtol=1e-6, atol=1e-6)
    # the hook on the original did not survive: a fresh apply is unscaled again
    assert torch.equal(logits(pm.apply(recipe(two_llamas, path))), plain)


def test_scale_by_hand_written_forward(pm: PathModel, two_llamas) -> None:
    """Embeddings -> layers with h * scale -> norm -> head, calling the loaded modules directly."""
    from transformers.masking_utils import create_causal_mask

    steps, scales = "B0 A1 A1 B2 A3", {0: 0.8, 3: 1.7}
    got = logits(pm.apply(recipe(two_llamas, steps, scales=scales)))
    a = pm.models[two_llamas[0]]  # embed_from = A
    layers = {"A": pm._layers[two_llamas[0]], "B": pm._layers[two_llamas[1]]}
    with torch.no_grad():
        dec = a.get_decoder()
        h = dec.embed_tokens(PROMPT)
        pos = torch.arange(PROMPT.shape[1]).unsqueeze(0)
        rope = dec.rotary_emb(h, position_ids=pos)
        mask = create_causal_mask(config=a.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=pos)
        for i, tok in enumerate(steps.split()):
            h = h * scales.get(i, 1.0)
            h = layers[tok[0]][int(tok[1:])](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        ref = a.lm_head(dec.norm(h))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_scale_one_installs_no_hook_and_scaled_views_do(pm: PathModel, two_llamas) -> None:
    live = pm.apply(recipe(two_llamas, "A0 A1 A2 A3", scales={1: 1.3}))
    hooks = [len(v._forward_pre_hooks) for v in live.get_decoder().layers]
    assert hooks == [0, 1, 0, 0]
    assert all(len(layer._forward_pre_hooks) == 0 for layer in pm._layers[two_llamas[0]])


# -- sharing and switching -----------------------------------------------------------------------
def test_mixed_path_shares_weights_and_switching_leaves_no_trace(pm: PathModel, two_llamas) -> None:
    ra, rb = two_llamas
    a_layers, b_layers = pm._layers[ra], pm._layers[rb]
    a_ids = [id(m) for layer in a_layers for m in layer.modules()]
    a_idx = [layer.self_attn.layer_idx for layer in a_layers]
    own_a = logits(pm.apply(own_path(two_llamas, "A")))
    mixed_recipe = recipe(two_llamas, "A0 B1 A2 B3")
    live = pm.apply(mixed_recipe)
    mixed = logits(live)
    assert not torch.allclose(mixed, own_a, atol=1e-3)
    for view, src in zip(live.get_decoder().layers, [a_layers[0], b_layers[1], a_layers[2], b_layers[3]]):
        assert view is not src and type(view) is type(src)
        assert weight_ptrs(view) == weight_ptrs(src)  # the same storage: no copy
        assert view.mlp is src.mlp and view.self_attn.q_proj is src.self_attn.q_proj
        assert view.self_attn is not src.self_attn
    # resident size: both models once each, although A now also reaches B's layers through views
    plain_bytes = sum(p.numel() * p.element_size() for p in load_plain(ra).parameters())
    assert pm.model_bytes() == 2 * plain_bytes
    # back and forth: identical results, other models untouched
    own_b = logits(pm.apply(own_path(two_llamas, "B")))
    assert torch.equal(logits(pm.apply(mixed_recipe)), mixed)
    assert torch.equal(logits(pm.apply(own_path(two_llamas, "B"))), own_b)
    assert torch.equal(logits(pm.apply(own_path(two_llamas, "A"))), own_a)
    assert torch.equal(own_a, logits(load_plain(ra)))
    # B is no longer live: its own layers and config are back
    b = pm.models[rb]
    assert decoder_layers(b) == b_layers and b.config.num_hidden_layers == N_LAYERS
    # the originals were never modified
    assert [id(m) for layer in a_layers for m in layer.modules()] == a_ids
    assert [layer.self_attn.layer_idx for layer in a_layers] == a_idx
    assert "live: 4 layers: A0 A1 A2 A3" in pm.describe()


def test_bad_recipes_are_one_line_errors_and_change_nothing(pm: PathModel, two_llamas) -> None:
    good = logits(pm.apply(recipe(two_llamas, "A0 B1")))
    with pytest.raises(RecipeError, match="layer 9"):
        pm.apply(recipe(two_llamas, "A0 B9"))
    with pytest.raises(RecipeError, match="not one of the loaded models"):
        pm.apply(PathRecipe(models=["/nowhere/C"], embed_from="/nowhere/C",
                            path=[PathStep(model="/nowhere/C", layer=0)]))
    assert torch.equal(logits(pm.live), good)


def test_output_hidden_states_counts_path_positions(pm: PathModel, two_llamas) -> None:
    live = pm.apply(recipe(two_llamas, "A0 A1 A1 B2 A3 A3"))
    with torch.no_grad():
        out = live(input_ids=PROMPT, output_hidden_states=True)
    assert len(out.hidden_states) == 7


# -- Qwen2 (layer_types) -------------------------------------------------------------------------
def test_qwen2_layer_types_follow_the_path_and_cache_matches(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    refs = []
    for name, seed in (("Q", 3), ("R", 4)):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          use_sliding_window=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / name, safe_serialization=True)
        refs.append(str(tmp_path / name))
    pm = PathModel(load_model_set(None, refs))
    own = logits(pm.apply(PathRecipe(models=refs, embed_from=refs[0],
                                     path=[PathStep(model=refs[0], layer=i) for i in range(3)])))
    assert torch.equal(own, logits(load_plain(refs[0])))
    path = [PathStep(model=refs[0], layer=0), PathStep(model=refs[1], layer=1), PathStep(model=refs[0], layer=1),
            PathStep(model=refs[0], layer=1, scale=1.4), PathStep(model=refs[1], layer=2)]
    live = pm.apply(PathRecipe(models=refs, embed_from=refs[0], path=path))
    assert live.config.num_hidden_layers == 5
    assert live.config.layer_types == ["full_attention"] * 5
    assert greedy(live, use_cache=True) == greedy(live, use_cache=False)
    assert torch.equal(logits(pm.apply(PathRecipe(models=refs, embed_from=refs[0],
                                                  path=[PathStep(model=refs[0], layer=i) for i in range(3)]))), own)
    assert pm.models[refs[0]].config.layer_types == ["full_attention"] * 3
