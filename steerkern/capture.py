"""Activation capture for extraction: hooks on the requested modules only, the last
``last_n_tokens`` non-pad positions of each row kept, the forward pass stopped after the
deepest requested module, length-sorted batches, and per-example vector-Jacobian products for
the ``grad`` method. Never ``output_hidden_states``.

Read positions come from the attention mask and position ids count non-pad tokens, so left and
right padding give the same activations.
"""

from __future__ import annotations

import torch

from steerkern.models import RESIDUAL, resolve_module


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass early (caught by the runner)."""


# --- tokens and positions ---------------------------------------------------------------------


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text; special tokens are added unless the text already starts with the BOS
    string (a rendered chat template does)."""
    bos = getattr(tokenizer, "bos_token", None)
    ids = []
    for text in texts:
        special = not (bos and text.startswith(bos))
        ids.append(list(tokenizer(text, add_special_tokens=special)["input_ids"]))
    return ids


def _pad(seqs: list[list[int]], pad_id: int, side: str):
    """``(input_ids [B, T], attention_mask [B, T], position_ids [B, T])``; positions count
    non-pad tokens, so left and right padding give every token the same position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


def last_positions(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Indices ``[B, n]`` of the last ``n`` non-pad positions of each row, in order, computed
    from ``attention_mask [B, T]`` (works for left, right or mixed padding)."""
    counts = attention_mask.sum(1)
    if bool((counts < n).any()):
        short = int(counts.min())
        raise ValueError(f"last_n_tokens={n} but a text has only {short} tokens: lower last_n_tokens")
    order = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    key = torch.where(attention_mask.bool(), order, torch.full_like(order, -1))
    return key.topk(n, dim=1).values.flip(1)


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _main_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _as_btd(tensor: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """Module outputs are ``[B, T, D]``; some (MoE internals) are flattened ``[B*T, D]``."""
    if tensor.dim() == 2 and tensor.shape[0] == batch * width:
        return tensor.view(batch, width, -1)
    if tensor.dim() != 3:
        raise ValueError(f"cannot read per-token activations from an output of shape {tuple(tensor.shape)}")
    return tensor


# --- capture ----------------------------------------------------------------------------------


class _Runner:
    """Runs the model over texts in length-sorted batches with hooks on the requested modules."""

    def __init__(self, model, tokenizer, texts, batch_size, progress, desc):
        self.model, self.tokenizer = model, tokenizer
        self.ids = _tokenize(tokenizer, texts)
        self.batches = _length_batches([len(s) for s in self.ids], batch_size)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.side = getattr(tokenizer, "padding_side", "left") or "left"
        self.progress, self.desc = progress, desc

    def __iter__(self):
        from tqdm.auto import tqdm

        device = _input_device(self.model)
        for batch in tqdm(self.batches, desc=self.desc, disable=not self.progress, leave=False):
            ids, mask, positions = _pad([self.ids[i] for i in batch], self.pad_id, self.side)
            yield batch, ids.to(device), mask.to(device), positions.to(device)

    def forward(self, ids, mask, positions):
        try:
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        except _StopForward:
            pass


def capture(model, tokenizer, texts, layers, *, target=RESIDUAL, last_n_tokens=1, batch_size=16,
            inputs=False, progress=True, desc="capture"):
    """Activations at the last ``last_n_tokens`` non-pad positions of each text.

    Returns ``{layer: Tensor [n_texts, last_n_tokens, D]}`` (fp32, CPU), and with
    ``inputs=True`` also the module inputs ``{layer: [n_texts, last_n_tokens, D_in]}``.
    Only the requested modules are hooked; the forward pass stops after the deepest one.
    """
    runner = _Runner(model, tokenizer, texts, batch_size, progress, desc)
    deepest = max(layers)
    outs = {layer: [None] * len(texts) for layer in layers}
    ins = {layer: [None] * len(texts) for layer in layers}
    state = {}

    def make_hook(layer):
        def hook(module, args, kwargs, output):
            batch, pos = state["batch"], state["pos"]
            width = state["width"]
            rows = torch.arange(len(batch), device=pos.device)[:, None]
            out = _as_btd(_main_tensor(output), len(batch), width)
            picked = out[rows.to(out.device), pos.to(out.device)].detach().float().cpu()
            for row, index in enumerate(batch):
                outs[layer][index] = picked[row]
            if inputs:
                x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
                x = _as_btd(x, len(batch), width)
                picked_in = x[rows.to(x.device), pos.to(x.device)].detach().float().cpu()
                for row, index in enumerate(batch):
                    ins[layer][index] = picked_in[row]
            if layer == deepest:
                raise _StopForward
        return hook

    handles = [resolve_module(model, layer, target).register_forward_hook(make_hook(layer), with_kwargs=True)
               for layer in layers]
    try:
        with torch.inference_mode():
            for batch, ids, mask, positions in runner:
                state.update(batch=batch, pos=last_positions(mask, last_n_tokens), width=ids.shape[1])
                runner.forward(ids, mask, positions)
    finally:
        for handle in handles:
            handle.remove()
    result = {layer: torch.stack(rows) for layer, rows in outs.items()}
    if inputs:
        return result, {layer: torch.stack(rows) for layer, rows in ins.items()}
    return result


def vjp_gradients(model, tokenizer, texts, layers, readout_layer, d, *, target=RESIDUAL,
                  last_n_tokens=1, batch_size=8, progress=True):
    """Per-text gradients ``{layer: [n_texts, D]}`` of ``sum_p d · h_{L'}[p]`` (``p`` the last
    ``last_n_tokens`` positions at the read-out layer ``L'``) with respect to a bias added to
    the steered module's output at every position of layer ``L`` — ``J_{L->L'}^T d`` summed
    over positions. One backward pass per batch for all layers; no Jacobian is built and no
    parameter gradient is accumulated."""
    runner = _Runner(model, tokenizer, texts, batch_size, progress, "grad")
    shallowest = min(layers)
    grads = {layer: [None] * len(texts) for layer in layers}
    held = {}

    def make_hook(layer):
        def hook(module, args, kwargs, output):
            out = _main_tensor(output)
            if layer == shallowest:
                leaf = out.detach().requires_grad_(True)
                held[layer] = leaf
                if isinstance(output, tuple):
                    return (leaf,) + tuple(output[1:])
                if isinstance(output, list):
                    return [leaf] + list(output[1:])
                return leaf
            held[layer] = out
            return None
        return hook

    def readout_hook(module, args, kwargs, output):
        held["readout"] = _main_tensor(output)
        raise _StopForward

    handles = [resolve_module(model, layer, target).register_forward_hook(make_hook(layer), with_kwargs=True)
               for layer in layers]
    handles.append(resolve_module(model, readout_layer, RESIDUAL).register_forward_hook(
        readout_hook, with_kwargs=True))
    try:
        with torch.enable_grad():
            for batch, ids, mask, positions in runner:
                held.clear()
                runner.forward(ids, mask, positions)
                top = _as_btd(held["readout"], len(batch), ids.shape[1])
                pos = last_positions(mask, last_n_tokens).to(top.device)
                rows = torch.arange(len(batch), device=top.device)[:, None]
                objective = (top[rows, pos].float() @ d.to(top.device, torch.float32)).sum()
                tensors = [held[layer] for layer in layers]
                found = torch.autograd.grad(objective, tensors, allow_unused=True)
                for layer, tensor, grad in zip(layers, tensors, found):
                    if grad is None:
                        grad = torch.zeros_like(tensor)
                    grad = _as_btd(grad, len(batch), ids.shape[1])
                    summed = (grad.float() * mask.to(grad.device)[..., None]).sum(1).cpu()
                    for row, index in enumerate(batch):
                        grads[layer][index] = summed[row]
    finally:
        for handle in handles:
            handle.remove()
        held.clear()
    return {layer: torch.stack(rows) for layer, rows in grads.items()}
