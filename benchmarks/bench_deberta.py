"""DeBERTa's cost on CPU: the disentangled attention layer, and a whole training step.

(a) Attention layer: tutorial_lib's attention sublayer with the DisentangledAttention
    plugin (projections, c2p/p2c bias, attention, output projection, residual and
    LayerNorm) against Hugging Face's ``DebertaV2Attention`` (its
    ``DisentangledSelfAttention`` plus the same output projection and LayerNorm),
    same weights, forward + backward, input gradients included. Each side builds its
    relative positions and normalises the relative table inside the step, as an
    encoder does once per forward pass.
(b) Encoder step: a DeBERTa-v3-style tutorial_lib encoder (no absolute positions,
    256 log buckets over 512 positions, shared keys, normalised table) against
    tutorial_lib's BERT encoder of the same shape; Hugging Face's DebertaV2Model of
    that shape is timed alongside for reference.

Everything runs in training mode (dropout on) on a half-padded batch, timed in
interleaved rounds (medians) like ``bench_encoder.py``, whose peak-memory method
(the high-water mark of the profiler's allocation events during one step) is
reused. The last line printed is one JSON object; ratios below 1 mean tutorial_lib
is faster or smaller.

    python benchmarks/bench_deberta.py                  # batch 8, 4 heads x 64, seq 128 and 512
    python benchmarks/bench_deberta.py --rounds 3 --seqs 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_encoder import peak_step_memory  # same directory: benchmarks/
from tutorial_lib import Encoder, TransformerConfig
from tutorial_lib.core.attention import AttentionContext
from tutorial_lib.interop import from_hf

GOALS = {"attention_time_ratio_vs_hf": 0.8, "attention_peak_memory_ratio_vs_hf": 1.0,
         "encoder_step_time_ratio_vs_bert": 1.6}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers in (b) (default 4)")
    parser.add_argument("--ffn", type=int, default=1024, help="feed-forward size (default 1024)")
    parser.add_argument("--vocab", type=int, default=30522, help="vocabulary (default 30522)")
    parser.add_argument("--buckets", type=int, default=256, help="position buckets (default 256)")
    parser.add_argument("--max-relative", type=int, default=512,
                        help="max_relative_positions (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512],
                        help="sequence lengths (default 128 512)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's)")
    return parser.parse_args()


def hf_deberta_config(args, layers: int):
    import transformers

    # transformers 5.x: position_buckets, share_att_key, norm_rel_ebd are extra kwargs.
    return transformers.DebertaV2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=layers,
        num_attention_heads=args.heads, intermediate_size=args.ffn,
        max_position_embeddings=max(512, max(args.seqs)), type_vocab_size=0,
        relative_attention=True, position_biased_input=False, pos_att_type="p2c|c2p",
        position_buckets=args.buckets, max_relative_positions=args.max_relative,
        share_att_key=True, norm_rel_ebd="layer_norm", layer_norm_eps=1e-7)


def timed(steps: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step, the steps interleaved (order alternating) in each round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(rounds):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def padded_mask(batch: int, seq: int) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq - seq // 4:] = 0  # half the batch padded: a real batch
    return mask


def attention_steps(args, seq: int):
    """(a): one step each of our attention sublayer and Hugging Face's DebertaV2Attention."""
    import transformers
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    torch.manual_seed(seq)
    hf_model = transformers.DebertaV2Model(hf_deberta_config(args, 1)).train()
    ours = from_hf(hf_model).train()
    hf_encoder, hf_attention = hf_model.encoder, hf_model.encoder.layer[0].attention
    block, plugins = ours.layers[0], tuple(ours.attention_plugins)
    hidden = torch.randn(args.batch, seq, args.hidden, requires_grad=True)
    mask = padded_mask(args.batch, seq)
    positions = torch.arange(seq)[None]

    def hf_step() -> None:
        relative_pos = build_relative_position(hidden, hidden, bucket_size=args.buckets,
                                               max_position=args.max_relative)
        out, _ = hf_attention(hidden, hf_encoder.get_attention_mask(mask),
                              relative_pos=relative_pos,
                              rel_embeddings=hf_encoder.get_rel_embedding())
        out.float().pow(2).mean().backward()
        hf_model.zero_grad(set_to_none=True)
        hidden.grad = None

    def our_step() -> None:
        ctx = AttentionContext(positions, positions, mask.bool(), causal=False,
                               relative_embeddings=ours.relative_embeddings())
        attended, _ = block.attention(hidden, ctx, plugins)
        out = block.attention_norm(hidden + block.dropout(attended))
        out.float().pow(2).mean().backward()
        ours.zero_grad(set_to_none=True)
        hidden.grad = None

    return {"ours": our_step, "hf": hf_step}


def encoder_steps(args, seq: int):
    """(b): training steps of our DeBERTa encoder, our BERT encoder and HF's DeBERTa."""
    import transformers

    torch.manual_seed(seq)
    hf_model = transformers.DebertaV2Model(hf_deberta_config(args, args.layers)).train()
    deberta = from_hf(hf_model).train()
    bert = Encoder(TransformerConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.heads, intermediate_size=args.ffn,
        max_position_embeddings=max(512, max(args.seqs)))).train()
    generator = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, args.vocab, (args.batch, seq), generator=generator)
    mask = padded_mask(args.batch, seq)

    def step(model, hf: bool):
        def run() -> None:
            hidden = (model(input_ids=ids, attention_mask=mask).last_hidden_state if hf
                      else model(ids, mask))
            hidden.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    return {"deberta": step(deberta, False), "bert": step(bert, False),
            "hf_deberta": step(hf_model, True)}


def main() -> None:
    args = parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, hidden {args.hidden}, "
          f"heads {args.heads}, buckets {args.buckets}, max_relative {args.max_relative}")
    attention, encoder = {}, {}
    for seq in args.seqs:
        steps = attention_steps(args, seq)
        median = timed(steps, args.rounds, args.warmup)
        memory = {name: peak_step_memory(step) for name, step in steps.items()}
        attention[f"seq{seq}"] = {
            "time_ratio_vs_hf": round(median["ours"] / median["hf"], 3),
            "peak_memory_ratio_vs_hf": round(memory["ours"] / memory["hf"], 3)}
        print(f"attention seq {seq}: ours {median['ours'] * 1e3:.1f} ms, HF "
              f"{median['hf'] * 1e3:.1f} ms; peak ours {memory['ours'] / 2**20:.1f} MiB, "
              f"HF {memory['hf'] / 2**20:.1f} MiB")
    for seq in args.seqs:
        steps = encoder_steps(args, seq)
        median = timed(steps, args.rounds, args.warmup)
        memory = {name: peak_step_memory(step) for name, step in steps.items()}
        encoder[f"seq{seq}"] = {
            "time_ratio_vs_bert": round(median["deberta"] / median["bert"], 3),
            "peak_memory_ratio_vs_bert": round(memory["deberta"] / memory["bert"], 3),
            "hf_deberta_time_ratio_vs_bert": round(median["hf_deberta"] / median["bert"], 3),
            "time_ratio_vs_hf_deberta": round(median["deberta"] / median["hf_deberta"], 3)}
        print(f"encoder seq {seq}: DeBERTa {median['deberta'] * 1e3:.1f} ms, BERT "
              f"{median['bert'] * 1e3:.1f} ms, HF DeBERTa {median['hf_deberta'] * 1e3:.1f} ms; "
              f"peak DeBERTa {memory['deberta'] / 2**20:.1f} MiB, BERT "
              f"{memory['bert'] / 2**20:.1f} MiB, HF DeBERTa "
              f"{memory['hf_deberta'] / 2**20:.1f} MiB")
    print(json.dumps({"benchmark": "deberta_attention_vs_hf_and_encoder_step_vs_bert",
                      "device": "cpu", "threads": torch.get_num_threads(),
                      "rounds": args.rounds, "goals": GOALS, "attention": attention,
                      "encoder_step": encoder}))


if __name__ == "__main__":
    main()
