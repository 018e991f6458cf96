"""Fixtures shared by every test folder."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors: on a shared 2-core machine torch's thread handoff costs more than the math.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KDIFFUSION_VERSION = "0.1.1.post1"


@pytest.fixture(scope="session")
def k_sampling():
    """k-diffusion's own sampling.py (the code A1111 runs, and ComfyUI forked), version 0.1.1.post1, loaded
    alone: the package's __init__ imports its training stack (torchvision, kornia, wandb, ...), while
    sampling.py needs only scipy, torchdiffeq, torchsde, tqdm and `utils.append_dims`, which is compiled here
    from k-diffusion's utils.py source. Installed by scripts/test.sh (pip install --no-deps)."""
    import ast
    import importlib.metadata
    import importlib.util
    import sys
    import types

    try:
        dist = importlib.metadata.distribution("k-diffusion")
    except importlib.metadata.PackageNotFoundError:
        missing = (f"k-diffusion is not installed: pip install --no-deps k-diffusion=={KDIFFUSION_VERSION} "
                   "torchdiffeq (scripts/test.sh does)")
        if os.environ.get("CI"):
            pytest.fail(missing)                      # CI installs it: a missing reference is an error there
        pytest.skip(missing)
    assert dist.version == KDIFFUSION_VERSION, f"k-diffusion {dist.version}: the comparison pins {KDIFFUSION_VERSION}"
    root = "_kdiffusion_reference"                    # a private package name: never shadows a real k_diffusion
    if root + ".sampling" in sys.modules:
        return sys.modules[root + ".sampling"]
    utils_src = dist.locate_file("k_diffusion/utils.py").read_text()
    append_dims = next(n for n in ast.parse(utils_src).body if isinstance(n, ast.FunctionDef) and n.name == "append_dims")
    utils = types.ModuleType(root + ".utils")
    exec(compile(ast.Module(body=[append_dims], type_ignores=[]), "k_diffusion/utils.py", "exec"), utils.__dict__)
    package = types.ModuleType(root)
    package.__path__ = []
    package.utils = utils
    sys.modules[root], sys.modules[root + ".utils"] = package, utils
    spec = importlib.util.spec_from_file_location(root + ".sampling", dist.locate_file("k_diffusion/sampling.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _TorchWithRandn:
    """torch, except randn_like (what k-diffusion's module-level `torch` becomes under A1111's TorchHijack)."""

    def __init__(self, randn_like):
        self.randn_like = randn_like

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def k_randn(k_sampling, monkeypatch):
    """route(randn_like): k-diffusion's torch.randn_like calls (the churn noise of its euler / heun / dpm_2,
    its default noise samplers) go to `randn_like(x)` until the test ends, as A1111 routes them."""
    def route(randn_like):
        monkeypatch.setattr(k_sampling, "torch", _TorchWithRandn(randn_like))
    return route


@pytest.fixture(scope="session")
def clip_vocab_files():
    """write(folder, n_merges=48894) -> folder: vocab.json + merges.txt built from the bundled CLIP BPE file by
    OpenAI's recipe (simple_tokenizer.py), independently of the tokenizer under test; fewer merges give a
    smaller vocabulary whose BOS and EOS sit at 512 + n_merges and 513 + n_merges (CLIP: 49406, 49407)."""
    import gzip
    import json

    from diffusekit.models.tokenizer import find_bundled_bpe

    bpe = find_bundled_bpe()
    if bpe is None:
        pytest.skip("needs the CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)")

    def write(folder, n_merges: int = 48894):
        merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1: n_merges + 1]
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return folder

    return write


T5_TRAINING_TEXT = [
    "a red circle on a blue square", "the quick brown fox jumps over the lazy dog", "Ünïcödé café naïve résumé",
    "東京の夜景 and 北京", "emoji test", "numbers 1234 56.78 and 3/4", "photo, 8k, masterpiece, (best quality:1.2)",
    "a green triangle above a yellow star", "portrait of an old man, oil painting",
]


def write_t5_tokenizer(folder, vocab_size: int = 200):
    """A T5-style SentencePiece Unigram tokenizer.json (built with `tokenizers`: the real file cannot be
    downloaded here): <pad>=0, </s>=1, <unk>=2, Unigram pieces trained on a few captions, then the 100
    sentinels <extra_id_99..0>, and a tokenizer_config.json so transformers reads it as a T5Tokenizer.
    Returns the folder."""
    import json
    from pathlib import Path

    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.Unigram())
    tok.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Replace(tk.Regex(" {2,}"), " ")])
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = tk.trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                         unk_token="<unk>")
    tok.train_from_iterator(T5_TRAINING_TEXT * 20, trainer)
    tok.add_special_tokens([f"<extra_id_{i}>" for i in range(99, -1, -1)])
    tok.post_processor = tk.processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                          special_tokens=[("</s>", 1)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512, "pad_token": "<pad>",
        "eos_token": "</s>", "unk_token": "<unk>"}), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def t5_tokenizer_dir(tmp_path_factory):
    return write_t5_tokenizer(tmp_path_factory.mktemp("t5tok") / "tokenizer_3")
