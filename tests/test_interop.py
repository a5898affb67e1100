"""Import, export and generation, proven by logit parity with transformers' LlamaForCausalLM.

Models are tiny and random (weights scaled so the logits are O(1), norms away from 1, so a
wrong mapping cannot hide). Meta checkpoints are written here from such a model, sharded the
way Meta's model-parallel ranks save them. ``transformers`` is a test-only dependency.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.averaging import PolyakAveraging
from dist_harness import run_world
from recipe.cli import main as recipe_main
from recipe.interop import CheckpointError
from recipe.interop.checkpoint import StateDictSource, open_weights
from recipe.interop.export import export_hf
from recipe.interop.generate import generate, load_model
from recipe.interop.hf import to_hf_name, to_hf_tensor
from recipe.model import ModelArgs, RopeScaling, Transformer
from recipe.module import LlamaLightningModule, load_full_weights
from recipe.config import OptimizerConfig
from recipe.config import LRSchedule
from recipe.tokenizer import Tokenizer, default_tokenizer_path
from stdlib_corpus import stdlib_corpus

ARCH = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, ffn_dim_multiplier=None,
            max_seq_len=128, rope_theta=10000.0)
# original_max_seq_len 64 puts the scaled band inside these short sequences (head_dim 16, theta 1e4).
SCALED = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
BASE_TOKENS = 744  # + 256 special tokens: a 1,000-token tokenizer cut from Llama 3's


def make_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**ARCH, **overrides})


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def write_meta(model: Transformer, folder: Path, n_shards: int, embed_dim: int = 0) -> Path:
    """Meta's release layout: one consolidated.NN.pth per model-parallel rank, and params.json."""
    args = model.args
    folder.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in model.state_dict().items():
        kind = name.split(".")[-2]
        if t.ndim == 1:
            parts = [t] * n_shards
        elif kind in ("wk", "wv") and n_shards > args.n_kv_heads:  # ranks share K/V heads: copies
            heads = t.chunk(args.n_kv_heads, 0)
            parts = [heads[r * args.n_kv_heads // n_shards] for r in range(n_shards)]
        elif name == "tok_embeddings.weight":
            parts = t.chunk(n_shards, embed_dim)
        elif kind in ("wq", "wk", "wv", "w1", "w3", "output"):
            parts = t.chunk(n_shards, 0)
        else:
            parts = t.chunk(n_shards, 1)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for rank, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                                            "ffn_dim_multiplier", "norm_eps", "rope_theta")}
    (folder / "params.json").write_text(json.dumps({**params, "use_scaled_rope": False}))
    return folder


def cli(*argv) -> int:
    return recipe_main([str(a) for a in argv])


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    source = open_weights(path)
    return source.read(list(source.infos()))


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{what}: {name}"


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    """Llama 3's first ranks: every token of a BPE file is made of lower-ranked ones, so a prefix is a tokenizer."""
    path = tmp_path_factory.mktemp("tokenizer") / "small.model"
    lines = default_tokenizer_path().read_text().splitlines()[:BASE_TOKENS]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("n_shards,embed_dim", [(2, 0), (2, 1), (4, 0)], ids=["mp2", "mp2_embed_dim1", "mp4_kv_copies"])
def test_meta_import_merges_model_parallel_shards(tmp_path, capsys, n_shards, embed_dim):
    model = random_model(make_args())
    src = write_meta(model, tmp_path / "meta", n_shards, embed_dim)
    assert cli("import", "meta", src, tmp_path / "out", "--max-seq-len", 128) == 0
    printed = capsys.readouterr().out
    assert "--model.arch.dim 64" in printed and f"--model.init_weights_path {(tmp_path / 'out').resolve()}" in printed
    assert_bit_equal(all_tensors(tmp_path / "out"), model.state_dict(), "imported")
    assert json.loads((tmp_path / "out" / "model_args.json").read_text())["n_kv_heads"] == 2
    # ... and the init path of training loads it.
    fresh = Transformer(model.args)
    load_full_weights(fresh, tmp_path / "out")
    assert_bit_equal(fresh.state_dict(), model.state_dict(), "load_full_weights")


def test_round_trip_meta_recipe_hf_recipe_is_bit_equal(tmp_path):
    model = random_model(make_args(rope_scaling=SCALED))
    src = write_meta(model, tmp_path / "meta", 2)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    assert cli("import", "meta", src, tmp_path / "recipe", "--max-seq-len", 128) == 0
    # A small shard limit: the export spreads over several files.
    assert cli("export", tmp_path / "recipe", tmp_path / "hf", "--dtype", "fp32", "--no-tokenizer",
               "--max-shard-size", "200KB") == 0
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cli("import", "hf", tmp_path / "hf", tmp_path / "back") == 0
    assert_bit_equal(all_tensors(tmp_path / "back"), model.state_dict(), "meta -> recipe -> hf -> recipe")
    back = json.loads((tmp_path / "back" / "model_args.json").read_text())
    assert back["rope_scaling"]["factor"] == 8.0 and back["max_seq_len"] == 128


def test_hf_import_unties_a_tied_head(tmp_path):
    """Llama 3.2 1B/3B tie lm_head to the embedding; the recipe starts its own output from it."""
    from safetensors.torch import load_file, save_file

    model = random_model(make_args())
    source = StateDictSource(tmp_path, "model", model.args, model.state_dict())
    export_hf(source, model.args, tmp_path / "hf", dtype=torch.float32)
    (file,) = (tmp_path / "hf").glob("*.safetensors")
    tensors = load_file(file)
    del tensors["lm_head.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    del index["weight_map"]["lm_head.weight"]
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))

    tied = load_model(tmp_path / "hf")  # an HF directory reads like any checkpoint
    want = {**model.state_dict(), "output.weight": model.state_dict()["tok_embeddings.weight"]}
    assert_bit_equal(tied.state_dict(), want, "tied")


# ----------------------------------------------------------------------------- parity


def packed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 48 tokens: three documents, then one."""
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 48))
    docs = torch.tensor([[0] * 10 + [1] * 20 + [2] * 18, [0] * 48])
    return tokens, docs


def hf_logits_per_document(hf, tokens: torch.Tensor, docs: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
    """Each document alone, at the positions it has in its row (ours run 0..seq-1 over the row)."""
    out = []
    for row in range(tokens.shape[0]):
        for doc in docs[row].unique():
            idx = (docs[row] == doc).nonzero().flatten()
            start, end = int(idx[0]), int(idx[-1]) + 1
            logits = hf(input_ids=tokens[row:row + 1, start:end], position_ids=torch.arange(start, end)[None]).logits
            out.append((row, start, end, logits[0]))
    return out


@pytest.mark.parametrize("scaling", [None, SCALED], ids=["rope", "rope_scaling_llama3"])
def test_logit_parity_with_transformers(tmp_path, scaling):
    from transformers import LlamaForCausalLM

    model = random_model(make_args(rope_scaling=scaling))
    # From a plain state dict (what PolyakAveraging saves) with the architecture given separately.
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "model_args.json").write_text(json.dumps(
        {**ARCH, "rope_scaling": None if scaling is None else vars(scaling)}))
    assert cli("export", tmp_path / "weights.pt", tmp_path / "hf", "--dtype", "fp32", "--no-tokenizer",
               "--config", tmp_path / "model_args.json") == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == ("default" if scaling is None else "llama3")

    tokens, docs = packed_batch(model.args.vocab_size)
    with torch.no_grad():
        ours = model(tokens, docs)
        diffs = [(theirs - ours[row, start:end]).abs().max().item()
                 for row, start, end, theirs in hf_logits_per_document(hf, tokens, docs)]
    print(f"max |logit diff| vs transformers ({'rope_scaling' if scaling else 'plain rope'}): {max(diffs):.2e}; "
          f"max |logit| {ours.abs().max().item():.2f}")
    assert ours.abs().max() > 1.0  # logits large enough for the bound to mean something
    assert max(diffs) <= 1e-4
    if scaling is not None:  # the scaling changes these logits, so parity covers it
        plain = Transformer(make_args())
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain(tokens, docs) - ours).abs().max() > 1e-2


def test_exported_tokenizer_loads_in_transformers(tmp_path, small_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(small_tokenizer)
    model = random_model(make_args(vocab_size=tokenizer.vocab_size))
    source = StateDictSource(tmp_path, "model", model.args, model.state_dict())
    summary = export_hf(source, model.args, tmp_path / "hf", tokenizer=tokenizer)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(summary.files)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["def f(x):\n\treturn x ** 2  # squares\n", "Hello, world! It's 2024.", "  spaces   and\n\nnewlines "]
    for text in texts:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text) and hf_tok.decode(ids) == text
    assert hf_tok.encode("hi")[0] == tokenizer.bos_id == hf_tok.bos_token_id
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    # bf16 by default
    assert all(t.dtype == torch.bfloat16 for t in safetensors_of(tmp_path / "hf").values())


# ----------------------------------------------------------------------------- generation


def test_cached_generation_equals_uncached_greedy_decoding():
    model = random_model(make_args())
    prompt = [5, 17, 42, 7, 99]
    cached = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]
    # Sampling is reproducible by seed; a vanishing top-p leaves only the most likely token.
    sampled = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=3)
    assert sampled == generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=3) and sampled != cached
    assert generate(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=3) == cached


def test_generate_command(tmp_path, capsys, small_tokenizer):
    model = random_model(make_args(vocab_size=Tokenizer(small_tokenizer).vocab_size))
    src = write_meta(model, tmp_path / "meta", 1)
    assert cli("import", "meta", src, tmp_path / "w", "--max-seq-len", 128) == 0
    capsys.readouterr()
    assert cli("generate", "--ckpt", tmp_path / "w", "--prompt", "def main(", "--max-new-tokens", 8,
               "--temperature", 0, "--tokenizer", small_tokenizer) == 0
    assert capsys.readouterr().out.startswith("def main(")
    assert load_model(tmp_path / "w").args == model.args


# ----------------------------------------------------------------------------- parallel checkpoints


TRAIN_ARCH = dict(ARCH, dim=32, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=BASE_TOKENS + 256)
DATA = dict(seq_len=16, global_batch_size=4, micro_batch_size=2, val_batches=0, build_demo=False)


def _train_world(data_dir: str, init_dir: str, out_dir: str) -> None:
    """In one 2-rank world, from an imported weights directory: 2 steps under tp2 saving a DCP
    checkpoint and the Polyak average; then the first weights under pp2 (each rank its stage)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from recipe.data.datamodule import TokenDataModule
    from recipe.parallel.strategy import Parallel4DStrategy

    out, rank = Path(out_dir), int(os.environ["RANK"])

    def full(module) -> dict[str, torch.Tensor]:
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in module.model.named_parameters()}

    class Snapshot(L.Callback):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_train_start(self, trainer, pl_module) -> None:
            params = full(pl_module)  # a collective under tp: every rank
            torch.save(params, out / f"{self.name}_rank{rank}.pt")

    def fit(layout: dict, steps: int, callbacks: list) -> LlamaLightningModule:
        module = LlamaLightningModule(arch=ModelArgs(**TRAIN_ARCH), optimizer=OptimizerConfig(lr=1e-2),
                                      lr_schedule=LRSchedule(warmup_steps=1, decay_steps=10, min_lr=1e-3),
                                      init_weights_path=init_dir)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=Parallel4DStrategy(**layout), max_steps=steps,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(module, datamodule=TokenDataModule(data_dir=data_dir, **DATA))
        return module

    module = fit(dict(tp=2, dp_shard=1), 2, [
        Snapshot("initial_tp2"), PolyakAveraging(save_path=str(out / "polyak.pt")),
        ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_last=True)])
    params = full(module)
    if dist.get_rank() == 0:
        torch.save(params, out / "final.pt")
    fit(dict(pp=2, dp_shard=1), 1, [Snapshot("initial_pp2")])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, small_tokenizer) -> Path:
    from recipe.data.build import build_shards

    root = tmp_path_factory.mktemp("data")
    corpus = stdlib_corpus(root / "corpus", ["textwrap.py", "bisect.py"])
    build_shards(corpus, root / "shards", tokenizer=small_tokenizer, val_fraction=0.0, log=lambda s: None)
    return root / "shards"


def test_single_process_ckpt_exports_its_weights_and_average(tmp_path, shards):
    from recipe.data.datamodule import TokenDataModule

    module = LlamaLightningModule(arch=ModelArgs(**TRAIN_ARCH), optimizer=OptimizerConfig(lr=1e-2))
    polyak = PolyakAveraging()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[polyak, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(module, datamodule=TokenDataModule(data_dir=str(shards), **DATA))
    ckpt = tmp_path / "last.ckpt"
    assert ckpt.is_file()
    args = ModelArgs(**TRAIN_ARCH)
    for what, flags, weights in [("model", [], dict(module.model.named_parameters())),
                                 ("polyak", ["--averaged", "Polyak"], polyak.averages)]:
        # The architecture comes from the checkpoint's hyper-parameters.
        assert cli("export", ckpt, tmp_path / what, "--dtype", "fp32", "--no-tokenizer", *flags) == 0
        want = {to_hf_name(n): to_hf_tensor(n, t.detach(), args) for n, t in weights.items()}
        assert_bit_equal(safetensors_of(tmp_path / what), want, what)


def test_tp2_checkpoint_exports_like_the_same_weights_unsharded(tmp_path, shards, small_tokenizer):
    start = random_model(ModelArgs(**TRAIN_ARCH))
    assert cli("import", "meta", write_meta(start, tmp_path / "meta", 2), tmp_path / "init", "--max-seq-len", 128) == 0
    run_world(_train_world, 2, timeout=300, init_pg=False, data_dir=str(shards),
              init_dir=str(tmp_path / "init"), out_dir=str(tmp_path))
    # The import loaded exactly under tp2 and pp2 (and training then moved the weights).
    assert_bit_equal(torch.load(tmp_path / "initial_tp2_rank0.pt"), start.state_dict(), "initial weights, tp2")
    stages = {**torch.load(tmp_path / "initial_pp2_rank0.pt"), **torch.load(tmp_path / "initial_pp2_rank1.pt")}
    assert_bit_equal(stages, start.state_dict(), "initial weights, pp2")
    final = torch.load(tmp_path / "final.pt")
    assert max((final[n] - t).abs().max().item() for n, t in start.state_dict().items()) > 1e-3

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()  # Lightning's DCP layout
    config = tmp_path / "init" / "model_args.json"
    pairs = {
        "model": (ckpt, [], tmp_path / "final.pt"),
        "polyak": (ckpt, ["--averaged", "polyak"], tmp_path / "polyak.pt"),
    }
    for what, (sharded, flags, unsharded) in pairs.items():
        a, b = tmp_path / f"hf_{what}_sharded", tmp_path / f"hf_{what}_full"
        assert cli("export", sharded, a, "--dtype", "fp32", "--tokenizer", small_tokenizer, *flags) == 0
        assert cli("export", unsharded, b, "--dtype", "fp32", "--tokenizer", small_tokenizer, "--config", config) == 0
        assert_bit_equal(safetensors_of(a), safetensors_of(b), what)
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    want = {to_hf_name(n): to_hf_tensor(n, t, ModelArgs(**TRAIN_ARCH)) for n, t in final.items()}
    assert_bit_equal(safetensors_of(tmp_path / "hf_model_sharded"), want, "exported vs trained")

    # A shard cut short no longer matches the checkpoint's manifest: refused in one line.
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"is damaged .*{shard.name}"):
        open_weights(ckpt)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(tmp: Path, small_tokenizer: Path) -> dict[str, tuple[list, str]]:
    """name -> (command line, a piece of the one-line error it must print)."""
    model = random_model(make_args())
    good = write_meta(model, tmp / "good", 2)
    assert cli("import", "meta", good, tmp / "weights", "--max-seq-len", 128) == 0
    small = tmp / "small.json"
    small.write_text(json.dumps({**ARCH, "dim": 32}))

    gap = write_meta(model, tmp / "gap", 4)
    (gap / "consolidated.01.pth").unlink()
    last = write_meta(model, tmp / "last", 2)
    (last / "consolidated.01.pth").unlink()
    unknown = write_meta(model, tmp / "unknown", 2)
    for f in unknown.glob("*.pth"):
        shard = torch.load(f)
        torch.save({**shard, "layers.0.attention.wq.bias": torch.zeros(32)}, f)
    extra = tmp / "extra.pt"
    torch.save({**model.state_dict(), "lm_head.weight": torch.zeros(1)}, extra)

    assert cli("export", tmp / "weights", tmp / "hf", "--no-tokenizer", "--max-shard-size", "100KB") == 0
    index = json.loads((tmp / "hf" / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (tmp / "hf" / lost).unlink()
    return {
        "shape": (["export", tmp / "weights", tmp / "o1", "--config", small],
                  "tok_embeddings.weight has shape [256, 64] but the model config gives [256, 32]"),
        "missing_shard_gap": (["import", "meta", gap, tmp / "o2"], "consolidated.01.pth is missing"),
        "missing_last_shard": (["import", "meta", last, tmp / "o3"], "consolidated.01.pth and later are missing"),
        "missing_hf_shard": (["import", "hf", tmp / "hf", tmp / "o4"], f"{lost}, which is missing"),
        "unknown_meta_key": (["import", "meta", unknown, tmp / "o5"], "layers.0.attention.wq.bias"),
        "unknown_key": (["export", extra, tmp / "o6", "--no-tokenizer", "--config", tmp / "weights"],
                        "(first: lm_head.weight)"),
        "vocabulary": (["export", tmp / "weights", tmp / "o7", "--tokenizer", small_tokenizer],
                       "has 1000 tokens but the model's vocab_size is 256"),
        "existing_output": (["export", tmp / "weights", tmp / "weights"], "already exists"),
    }


def test_bad_input_gives_one_line_errors(tmp_path, capsys, small_tokenizer):
    cases = _bad_inputs(tmp_path, small_tokenizer)
    capsys.readouterr()
    for name, (argv, expected) in cases.items():
        assert cli(*argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, f"{name}: {err}"
    # Nothing half-written: a failed run leaves no output directory.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o") and p.name[1:2].isdigit()]
