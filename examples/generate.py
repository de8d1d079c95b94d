"""Generate tokens with a small Llama-style model (random weights) on a paged KV cache.

The same weights run twice: once with flashtile (prefill and decode through
``flash_attn_with_kvcache``, rotary embedding and the cache append inside the call, pages in a
shuffled order), once with PyTorch SDPA on a contiguous cache. Prints tokens/s of each and
whether they generated the same tokens (greedy decoding).

    PYTHONPATH=src python3 examples/generate.py                  # GPU, bf16
    PYTHONPATH=src python3 examples/generate.py --tiny --device cpu
"""

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashtile import flash_attn_with_kvcache
from flashtile.rotary import apply_rotary


@dataclass
class ModelConfig:
    vocab: int = 32000
    dim: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    hidden: int = 5632
    rope_base: float = 10000.0

    @property
    def head_dim(self):
        return self.dim // self.heads


TINY = ModelConfig(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, hidden=128)


class Model:
    """Llama's blocks (RMSNorm, GQA attention with rotary embedding, SwiGLU MLP) as plain tensors."""

    def __init__(self, cfg: ModelConfig, device, dtype, max_len):
        g = torch.Generator(device="cpu").manual_seed(0)

        def weight(*shape):
            return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(device=device, dtype=dtype)

        self.cfg = cfg
        self.embed = weight(cfg.vocab, cfg.dim) * cfg.dim ** 0.5
        self.blocks = [dict(wqkv=weight((cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.dim),
                            wo=weight(cfg.dim, cfg.dim), w13=weight(2 * cfg.hidden, cfg.dim),
                            w2=weight(cfg.dim, cfg.hidden)) for _ in range(cfg.layers)]
        self.head = weight(cfg.vocab, cfg.dim)
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
        angles = torch.arange(max_len, device=device).float()[:, None] * inv_freq[None, :]
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, tokens, attend):
        """Logits of the last position; ``attend(layer, q, k, v)`` is the attention (with its cache)."""
        cfg = self.cfg
        x = self.embed[tokens]  # (B, S, dim)
        batch, seqlen = tokens.shape
        for layer, w in enumerate(self.blocks):
            h = F.rms_norm(x, (cfg.dim,))
            q, k, v = (h @ w["wqkv"].T).split([cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim,
                                              cfg.kv_heads * cfg.head_dim], dim=-1)
            q = q.view(batch, seqlen, cfg.heads, cfg.head_dim)
            k = k.view(batch, seqlen, cfg.kv_heads, cfg.head_dim)
            v = v.view(batch, seqlen, cfg.kv_heads, cfg.head_dim)
            x = x + attend(layer, q, k, v).reshape(batch, seqlen, cfg.dim) @ w["wo"].T
            gate, up = (F.rms_norm(x, (cfg.dim,)) @ w["w13"].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w["w2"].T
        return F.rms_norm(x[:, -1], (cfg.dim,)) @ self.head.T


class PagedFlashtileCache:
    """One paged K/V cache per layer; pages handed out in a shuffled order."""

    def __init__(self, model, batch, max_len, page_size):
        cfg = model.cfg
        pages_per_seq = -(-max_len // page_size)
        shape = (batch * pages_per_seq, page_size, cfg.kv_heads, cfg.head_dim)
        device, dtype = model.embed.device, model.embed.dtype
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.block_table = torch.randperm(batch * pages_per_seq).view(batch, pages_per_seq).int().to(device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.model = model

    def attend(self, layer, q, k, v):
        # Rotary on q and the new k, append into the pages, attention: one call.
        return flash_attn_with_kvcache(q, self.k[layer], self.v[layer], k, v, rotary_cos=self.model.cos,
                                       rotary_sin=self.model.sin, cache_seqlens=self.seqlens,
                                       block_table=self.block_table, causal=True, rotary_interleaved=False)

    def advance(self, n):
        self.seqlens += n


class SdpaCache:
    """Contiguous caches (B, max_len, Hk, D) and SDPA; rotary with torch ops."""

    def __init__(self, model, batch, max_len):
        cfg = model.cfg
        shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
        device, dtype = model.embed.device, model.embed.dtype
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.length = 0
        self.model = model

    def attend(self, layer, q, k, v):
        batch, seqlen = q.shape[:2]
        positions = torch.arange(self.length, self.length + seqlen, device=q.device).expand(batch, seqlen)
        q = apply_rotary(q, self.model.cos, self.model.sin, positions, interleaved=False)
        k = apply_rotary(k, self.model.cos, self.model.sin, positions, interleaved=False)
        end = self.length + seqlen
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        keys, values = self.k[layer][:, :end].transpose(1, 2), self.v[layer][:, :end].transpose(1, 2)
        # A prompt attends causally; a single new token sees every cached key.
        mask = None
        if seqlen > 1:
            mask = torch.ones(seqlen, end, dtype=torch.bool, device=q.device).tril(end - seqlen)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    def advance(self, n):
        self.length += n


def generate(model, cache, prompt, new_tokens, device, forced=None):
    """Greedy decoding: (tokens, last-position logits of each step, prefill s, decode s). With
    ``forced`` (B, new_tokens), those tokens are fed back instead of the argmax (teacher forcing),
    so two models can be compared step by step on the same context."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    logits = [model.forward(prompt, cache.attend)]
    cache.advance(prompt.shape[1])
    sync()
    prefill = time.perf_counter() - start
    tokens = [logits[-1].argmax(-1)]
    start = time.perf_counter()
    for step in range(new_tokens - 1):
        fed = tokens[-1] if forced is None else forced[:, step]
        logits.append(model.forward(fed[:, None], cache.attend))
        cache.advance(1)
        tokens.append(logits[-1].argmax(-1))
    sync()
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1), prefill, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke run)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.tiny else ModelConfig()
    max_len = args.prompt + args.new_tokens
    model = Model(cfg, device, dtype, max_len)
    prompt = torch.randint(0, cfg.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    make = {"flashtile": lambda: PagedFlashtileCache(model, args.batch, max_len, args.page_size),
            "sdpa": lambda: SdpaCache(model, args.batch, max_len)}
    results = {}
    with torch.inference_mode():
        for name in make:
            generate(model, make[name](), prompt, 3, device)  # warm-up at the same shapes: compile the kernels
            results[name] = generate(model, make[name](), prompt, args.new_tokens, device)
        # SDPA on flashtile's tokens: the same context at every step, so the steps compare one to one.
        forced_tokens, forced_logits, _, _ = generate(model, make["sdpa"](), prompt, args.new_tokens, device,
                                                      forced=results["flashtile"][0])
    print(f"{cfg.layers} layers, dim {cfg.dim}, {cfg.heads} heads / {cfg.kv_heads} KV heads, {dtype}, "
          f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, page size {args.page_size}")
    for name, (_, _, prefill, decode) in results.items():
        rate = args.batch * (args.new_tokens - 1) / decode
        print(f"{name:9s}: prefill {prefill * 1e3:8.1f} ms, decode {rate:9.1f} tokens/s")
    ours = results["flashtile"]
    agree = (forced_tokens == ours[0]).float().mean().item()
    diff = (forced_logits.float() - ours[1].float()).abs().max().item()
    scale = forced_logits.float().abs().max().item()
    print(f"same context, SDPA's greedy token = flashtile's: {agree:.1%} of steps; max |logit difference| {diff:.3g} "
          f"(logits up to {scale:.3g})")
    return dict(results=results, agreement=agree, max_logit_diff=diff, logit_scale=scale)


if __name__ == "__main__":
    main()
