"""The frozen bottom layers, run once per preservation sample instead of once per step.

With adapters on the top N decoder layers only (`lora.top_layers`), nothing below them changes during training:
the hidden state entering the first adapted layer is a fixed function of a sample's tokens. The preservation
samples are the same in every `selfcog run` on a base model (more than half of the training tokens), so
`attach_bottom_hidden` computes their states once and caches them per base weights, like their base top-k; the
packing collator lines them up with the packed row, and each step runs the frozen layers only over the row's
shared prefix and identity samples (`bottom_then_top`), then the adapted layers over the whole row. Exact:
tests/test_train.py shows the same loss and gradients as running every layer.

Public APIs only: a forward pre-hook on the first adapted layer catches its input and ends the forward pass there
(the capture pattern GPTQ/AWQ quantizers use for layer inputs); the top pass hands the states to the model as
`inputs_embeds`, with the decoder's `layers` list cut to the adapted layers for that call. A model that
transforms `inputs_embeds` before its first layer (OPT adds position embeddings) would not compute the same thing,
so `reusable` checks the round trip on a real sample first and training otherwise runs every layer.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.utils import extract_model_from_parallel

from selfcog.attention import check_used, packed_attention, packed_layout
from selfcog.cache import cached_tensors
from selfcog.data.packing import pack_to_max_length
from selfcog.data.tokenize import pack_batch


class _Caught(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def decoder_of(model):
    """The decoder stack (`LlamaModel` and its kind) under a causal LM, a peft model or a DDP wrapper, or None."""
    base = extract_model_from_parallel(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return decoder if isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) else None


@torch.no_grad()
def hidden_before(model, layer: int, **forward_kwargs) -> torch.Tensor:
    """The hidden states entering decoder layer `layer` for a forward pass with `forward_kwargs`; the pass stops
    there, so the layers from `layer` up and the LM head never run."""
    def catch(module, args, kwargs):
        raise _Caught(args[0] if args else kwargs["hidden_states"])

    handle = decoder_of(model).layers[layer].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(**forward_kwargs)
    except _Caught as caught:
        return caught.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached decoder layer {layer}")


@contextmanager
def top_layers_only(model, layer: int):
    """Within the block the model's decoder runs its layers from `layer` up: feed it `inputs_embeds` = the hidden
    states entering that layer."""
    decoder = decoder_of(model)
    every = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(every)[layer:])
    try:
        yield
    finally:
        decoder.layers = every


@torch.no_grad()
def reusable(model, layer: int, input_ids: list[int]) -> bool:
    """Whether the bottom/top split reproduces the model's own logits on one sample (within fp32 rounding)."""
    if decoder_of(model) is None or not 0 < layer < len(decoder_of(model).layers):
        return False
    ids = torch.tensor([input_ids], device=model.device)
    full = model(input_ids=ids, use_cache=False).logits
    hidden = hidden_before(model, layer, input_ids=ids, use_cache=False)
    with top_layers_only(model, layer):
        split = model(inputs_embeds=hidden, use_cache=False).logits
    return torch.allclose(full, split, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def per_position(model, samples: list[dict], forward, row_tokens: int = 512) -> dict[str, torch.Tensor]:
    """`forward(model, inputs, layout)` -> a dict of per-position tensors for one packed row, run over `samples`
    packed whole into rows of about `row_tokens` (no shared prefix, so a row is its samples' positions back to
    back); each entry concatenated over the rows."""
    outputs: dict[str, list[torch.Tensor]] = {}
    with packed_attention(model):
        for group in pack_to_max_length(samples, row_tokens):
            inputs = pack_batch(group, share_prefix=False)
            layout = packed_layout(inputs["packed_lengths"], model.device)
            for key, value in forward(model, inputs, layout).items():
                outputs.setdefault(key, []).append(value.cpu())
            check_used(layout, model)
    return {key: torch.cat(values) for key, values in outputs.items()}


def attach_bottom_hidden(model, examples: list[dict], layer: int, fingerprint: str | None = None) -> list[dict]:
    """Give every preservation example `bottom_hidden`: the [tokens, hidden] states entering decoder layer `layer`,
    from the base model (the layers below carry no adapter), cached per base weights. Returns the examples, the
    preservation ones copied with the states added."""
    def bottom(model, inputs, layout):
        device = model.device
        return {"hidden": hidden_before(model, layer, input_ids=inputs["input_ids"].to(device), use_cache=False,
                                        position_ids=inputs["position_ids"].to(device), packed_layout=layout)[0]}

    wanted = [i for i, e in enumerate(examples) if e.get("preserve")]
    if not wanted:
        return examples
    samples = [examples[i] for i in wanted]
    payload = {"bottom_hidden_before_layer": layer, "samples": [s["input_ids"] for s in samples]}
    hidden = cached_tensors(fingerprint, payload, lambda: per_position(model, samples, bottom))["hidden"]
    out, start = list(examples), 0
    for i, sample in zip(wanted, samples):
        n = len(sample["input_ids"])
        out[i] = {**sample, "bottom_hidden": hidden[start:start + n]}
        start += n
    return out


def bottom_then_top(model, layer: int, inputs: dict, stored: torch.Tensor, preserve: torch.Tensor, lengths,
                    **forward_kwargs):
    """The packed row's forward pass when `stored` holds the states entering `layer` for its preservation samples
    (the row's tail: pack_batch puts them last): the frozen layers run over the shared prefix and the samples
    before that tail only, then the layers from `layer` up over the whole row."""
    ids, positions = inputs["input_ids"], inputs["position_ids"]
    start = int(preserve[0].long().argmax())  # the first preservation token
    prefix, *rests = [int(n) for n in lengths]
    ends = torch.tensor(rests).cumsum(0) + prefix
    before = [prefix] + [n for n, end in zip(rests, ends.tolist()) if end <= start]
    hidden = stored
    if len(before) > 1:  # samples without stored states: they and the prefix go through the frozen layers
        layout = packed_layout(before, ids.device)
        fresh = hidden_before(model, layer, input_ids=ids[:, :start], position_ids=positions[:, :start],
                              use_cache=False, packed_layout=layout)
        check_used(layout, model)
        hidden = torch.cat([fresh.to(stored.dtype), stored[:, start:]], dim=1)
    with top_layers_only(model, layer):
        return model(inputs_embeds=hidden, position_ids=positions, use_cache=False, **forward_kwargs)
