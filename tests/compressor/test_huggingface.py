"""Hugging Face checkpoints: folder or archive in, verified ONNX and a loadable folder out."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import compressor
from compressor.config import CompressionConfig
from compressor.errors import DataError, ModelFormatError, UnsafeModelError
from compressor.load.huggingface import checkpoint_data, is_checkpoint, load_checkpoint
from tests.support.tiny_checkpoints import (
    VOCAB_SIZE,
    save_checkpoint,
    tar_folder,
    write_text,
    zip_folder,
)

FAST = {"ratio": 0.5, "finetune": {"steps": 4, "eval_every": 2}, "export": {"latency_seconds": 0},
        "min_layer_params": 0, "data": {"max_length": 16, "synthetic_samples": 32}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: save_checkpoint(kind, root / kind) for kind in ("sentence", "classifier", "llama")}


def copy_of(folders: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    target = tmp_path / kind
    shutil.copytree(folders[kind], target)
    return target


def unzip(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as files:
        files.extractall(dest)
    return dest


def onnx_run(path: Path, ids: torch.Tensor, mask: torch.Tensor,
             with_types: bool = True) -> tuple[list[str], list[str], np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    (out,) = session.run(None, feed)
    return names, [o.name for o in session.get_outputs()], out


def some_tokens(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length // 2:] = 0  # one padded row
    return ids, mask


@pytest.mark.slow
def test_a_sentence_transformers_folder_with_text_gives_a_pooled_onnx_and_a_loadable_folder(
    folders, tmp_path
) -> None:
    from transformers import BertModel

    data = write_text(tmp_path / "lines.txt")
    result = compressor.compress(folders["sentence"], FAST, data=data, out_dir=tmp_path / "out")
    report = result.report
    assert report["data"]["source"] == "lines.txt" and not report["data"]["synthetic"]
    assert report["onnx_parity"]["huggingface"]["passed"]
    assert set(report["artifacts"]) == {"model.onnx", "model-hf.zip", "job.log"}
    for batch, length in ((1, 5), (3, 11)):  # dynamic batch and sequence length
        ids, mask = some_tokens(batch, length)
        inputs, outputs, embedding = onnx_run(result.model_path, ids, mask)
        assert inputs == ["input_ids", "attention_mask", "token_type_ids"]
        assert outputs == ["sentence_embedding"]
        assert embedding.shape == (batch, 32)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    folder = unzip(tmp_path / "out" / "model-hf.zip", tmp_path / "small")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json",
                 "1_Pooling/config.json"):
        assert (folder / name).is_file(), name
    model = BertModel.from_pretrained(folder).eval()
    ids, mask = some_tokens(3, 9)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=1)
    _, _, embedding = onnx_run(result.model_path, ids, mask)
    np.testing.assert_allclose(embedding, pooled.numpy(), atol=1e-4, rtol=1e-3)
    original = BertModel.from_pretrained(folders["sentence"])
    assert not torch.equal(model.encoder.layer[0].intermediate.dense.weight,
                           original.encoder.layer[0].intermediate.dense.weight)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


@pytest.mark.slow
def test_a_zipped_classifier_without_data_keeps_its_head_and_says_inputs_were_sampled(
    folders, tmp_path
) -> None:
    from transformers import BertForSequenceClassification

    archive = zip_folder(folders["classifier"], tmp_path / "upload.zip", top="my-model")
    assert is_checkpoint(archive)
    result = compressor.compress(archive, FAST, out_dir=tmp_path / "out")
    assert result.report["data"]["synthetic"] and "sampled" in result.report["data"]["note"]
    for stage in result.report["fidelity"].values():  # a classifier's logits: no next token
        assert not {"perplexity", "original_perplexity", "next_tokens"} & set(stage["logits"])
    ids, mask = some_tokens(2, 7)
    _, outputs, logits = onnx_run(result.model_path, ids, mask)
    assert outputs == ["logits"] and logits.shape == (2, 3)
    folder = unzip(tmp_path / "out" / "model-hf.zip", tmp_path / "small")
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_a_decoder_as_tar_gz_with_jsonl_text_round_trips(folders, tmp_path) -> None:
    from transformers import LlamaForCausalLM

    archive = tar_folder(folders["llama"], tmp_path / "llama.tar.gz")
    data = write_text(tmp_path / "lines.jsonl", jsonl=True)
    result = compressor.compress(archive, FAST, data=data, out_dir=tmp_path / "out")
    ids, mask = some_tokens(2, 6)
    inputs, outputs, logits = onnx_run(result.model_path, ids, mask)
    assert inputs == ["input_ids", "attention_mask"] and outputs == ["logits"]
    assert logits.shape == (2, 6, VOCAB_SIZE)
    folder = unzip(tmp_path / "out" / "model-hf.zip", tmp_path / "small")
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-3)


def next_token_nll(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the log-probabilities (float64) a transformers LM gives every vocabulary entry at
    each position whose next token is text, and the mean NLL of that real next token."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kept = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    log_p = logits[:, :-1][kept].double().log_softmax(-1)
    nll = -log_p.gather(1, ids[:, 1:][kept][:, None]).mean()
    return log_p, nll


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_decoders_report_gives_held_out_perplexity_over_text_tokens_only(
    folders, tmp_path, quantize
) -> None:
    from transformers import LlamaForCausalLM

    # With int8, the original is exported too (the baseline: int8 of the original).
    config = {**FAST, "method": "lowrank", "ratio": 0.5,
              "export": {"latency_seconds": 0 if quantize is None else 0.01,
                         "quantize": quantize}}
    data = write_text(tmp_path / "lines.txt")
    result = compressor.compress(folders["llama"], config, data=data, out_dir=tmp_path / "out")
    fidelity = result.report["fidelity"]
    assert set(fidelity) == {"initialization", "final", "artifact"}  # the ONNX file scored too
    # The held-out split the job made, scored here by transformers itself in float64.
    parsed = CompressionConfig.parse(config)
    loaded = load_checkpoint(folders["llama"], tmp_path / "work", parsed.data.max_length)
    _, held_out = checkpoint_data(loaded, data, parsed.data, parsed.finetune.seed).split(
        parsed.data.holdout_fraction, parsed.finetune.seed)
    ids, mask = held_out.inputs["input_ids"], held_out.inputs["attention_mask"]
    assert (mask == 0).any()  # padded rows: their padding must not count
    original = LlamaForCausalLM.from_pretrained(folders["llama"]).eval()
    log_q, nll = next_token_nll(original, ids, mask)
    assert log_q.shape[0] < ids[:, 1:].numel()
    for stage in fidelity.values():
        figures = stage["logits"]
        assert figures["next_tokens"] == log_q.shape[0]
        assert figures["original_perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
        assert 0 <= figures["next_token_agreement"] <= 1 and figures["kl_divergence"] >= 0
    final, artifact = fidelity["final"]["logits"], fidelity["artifact"]["logits"]
    assert final["perplexity"] != pytest.approx(final["original_perplexity"], rel=1e-4)
    # The compressed model, as the folder written back holds it: its own perplexity against
    # the real next tokens (not the original's predictions), KL(original || it), agreement.
    small = LlamaForCausalLM.from_pretrained(unzip(tmp_path / "out" / "model-hf.zip",
                                                   tmp_path / "small")).eval()
    log_p, small_nll = next_token_nll(small, ids, mask)
    assert final["perplexity"] == pytest.approx(float(small_nll.exp()), rel=1e-5)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    assert final["kl_divergence"] == pytest.approx(float(kl), rel=1e-3, abs=1e-7)
    agreement = (log_p.argmax(-1) == log_q.argmax(-1)).double().mean()
    assert final["next_token_agreement"] == pytest.approx(float(agreement))
    # The artifact, run by onnxruntime: the same model in float32, int8 a little off it.
    assert artifact["perplexity"] == pytest.approx(final["perplexity"],
                                                   rel=1e-5 if quantize is None else 0.05)
    if quantize is not None:
        assert artifact["perplexity"] != final["perplexity"]
        baseline = result.report["baseline"]["fidelity"]["logits"]  # int8 of the original
        assert baseline["original_perplexity"] == final["original_perplexity"]
        assert baseline["perplexity"] == pytest.approx(final["original_perplexity"], rel=0.05)


@pytest.mark.parametrize(("kind", "next_token"), [("llama", True), ("gpt2", True),
                                                  ("masked", False), ("classifier", False)])
def test_only_a_causal_lms_sequence_logits_are_scored_by_perplexity(
    folders, tmp_path, kind, next_token
) -> None:
    """A masked LM's logits have the same shape as a causal LM's, but no next token."""
    from compressor.load.stage import next_token_outputs
    from compressor.runtime.objectives import detect_output_kinds
    from compressor.runtime.outputs import call, run_outputs

    folder = folders.get(kind) or save_checkpoint(kind, tmp_path / kind)
    loaded = load_checkpoint(folder, tmp_path / "work", 8)
    module = loaded.program.module()
    ids, mask = some_tokens(2, 8)
    sample = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in loaded.checkpoint.input_names:
        sample["token_type_ids"] = torch.zeros_like(ids)
    outputs = run_outputs(module, sample)
    kinds = detect_output_kinds(module, call(module, sample), outputs, "auto", ["logits"])
    assert kinds == ["logits"]
    assert next_token_outputs(loaded, kinds, outputs, sample) == [next_token]
    assert next_token_outputs(None, kinds, outputs, sample) == [False]  # a .pt2: not known


def test_the_factorized_form_gives_no_hugging_face_folder(folders, tmp_path,
                                                          monkeypatch) -> None:
    from transformers import PreTrainedModel

    from compressor.export import stage

    # The original transformers model holds the original's weights: it is gone before the
    # artifact is exported, whatever the form (it held them through export and verification).
    models_alive = []

    def export_onnx(module, *args, **kwargs):
        gc.collect()
        models_alive.append(sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))
        return stage_export_onnx(module, *args, **kwargs)

    stage_export_onnx = stage.export_onnx
    monkeypatch.setattr(stage, "export_onnx", export_onnx)
    config = {**FAST, "export": {"form": "factorized", "latency_seconds": 0}}
    result = compressor.compress(folders["classifier"], config, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert not (tmp_path / "out" / "model-hf.zip").exists()
    assert "huggingface" not in result.report["onnx_parity"]
    assert models_alive == [0]
    # and the original's tensors the compact form shares were copied: its file is released
    assert "so that the original is freed whole" in (tmp_path / "out" / "job.log").read_text()


def test_sampled_ids_stay_below_the_vocabulary_and_masks_are_ones(folders, tmp_path) -> None:
    config = CompressionConfig.parse(FAST)
    loaded = load_checkpoint(folders["sentence"], tmp_path, config.data.max_length)
    data = checkpoint_data(loaded, None, config.data, seed=0)
    assert data.synthetic and len(data) == 32
    ids = data.inputs["input_ids"]
    assert ids.shape == (32, 16) and int(ids.min()) >= 0 and int(ids.max()) < VOCAB_SIZE
    assert int(ids.max()) > VOCAB_SIZE // 2  # the whole vocabulary is sampled
    assert torch.equal(data.inputs["attention_mask"], torch.ones(32, 16, dtype=torch.int64))
    assert int(data.inputs["token_type_ids"].abs().sum()) == 0


def test_text_is_tokenized_truncated_and_padded_with_valid_masks(folders, tmp_path) -> None:
    config = CompressionConfig.parse({**FAST, "data": {"max_length": 6}})
    loaded = load_checkpoint(folders["sentence"], tmp_path, config.data.max_length)
    lines = ["the a", "", "return value list string number file path module object"]
    data = checkpoint_data(loaded, write_text(tmp_path / "t.txt", lines), config.data, seed=0)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    assert ids.shape == (2, 6)  # the blank line is skipped; truncated at max_length
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert ids[0].tolist()[:4] == [2, 4, 5, 3] and ids[0, 4:].tolist() == [0, 0]  # [CLS] .. [SEP] pad
    assert ids[1, -1].item() == 3  # [SEP] kept at the truncation


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dense", "factorized"])
def test_a_tied_head_and_input_table_are_compressed_once_and_stay_tied(tmp_path, form,
                                                                      monkeypatch):
    from transformers import GPT2LMHeadModel

    from compressor.export import stage

    exported_shapes = []  # of the tensors the module handed to the exporter holds

    def export_onnx(module, *args, **kwargs):
        exported_shapes.extend(tuple(t.shape) for t in module.state_dict().values())
        return stage_export_onnx(module, *args, **kwargs)

    stage_export_onnx = stage.export_onnx
    monkeypatch.setattr(stage, "export_onnx", export_onnx)
    folder = save_checkpoint("gpt2", tmp_path / "gpt2")
    config = {**FAST, "ratio": 0.5, "allocation": "uniform", "export": {
        "form": form, "latency_seconds": 0}}
    result = compressor.compress(folder, config, data=write_text(tmp_path / "lines.txt"),
                                 out_dir=tmp_path / "out")
    plan = result.report["plan"]
    head = next(layer for layer in plan["layers"] if layer["name"] == "model.lm_head")
    assert head["tied_embedding"] and head["method"] == "lowrank"
    assert plan["skipped"] == []  # the table is the head's weight: nothing left unmentioned
    assert not any(layer["name"].endswith("wte") for layer in plan["layers"])
    assert result.report["onnx_parity"]["passed"]  # both uses, verified in onnxruntime
    if form == "factorized":
        rank = head["size"]
        stored = {i.name: list(i.dims) for i in onnx.load(result.model_path).graph.initializer}
        # No dense table for either use, and each factor once: the rows and the head read the
        # same Aᵀ (rank × vocab) and Bᵀ (dim × rank), no transposed copy beside them.
        assert [96, 32] not in stored.values() and [32, 96] not in stored.values()
        assert list(stored.values()).count([rank, 96]) == 1
        # nor in memory: the input table's own name for the dense table left the module too
        assert (96, 32) not in exported_shapes and (32, 96) not in exported_shapes
        assert {n: d for n, d in stored.items() if "lm_head" in n} == {
            "compact__model__lm_head.At": [rank, 96], "compact__model__lm_head.Bt": [32, rank]}
        return
    with zipfile.ZipFile(tmp_path / "out" / "model-hf.zip") as archive:
        archive.extractall(tmp_path / "hf")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert model.config.tie_word_embeddings  # the tie is kept in the folder written back
    assert model.lm_head.weight is model.transformer.wte.weight
    original = GPT2LMHeadModel.from_pretrained(folder)
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)  # compressed


def test_a_causal_lms_long_text_is_cut_into_windows_so_every_token_counts(folders, tmp_path):
    config = CompressionConfig.parse({**FAST, "data": {"max_length": 6}})
    loaded = load_checkpoint(folders["llama"], tmp_path, config.data.max_length)
    words = "return value list string number file path module object the a of".split()
    lines = ["the a", " ".join(words)]
    data = checkpoint_data(loaded, write_text(tmp_path / "t.txt", lines), config.data, seed=0)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folders["llama"] / "tokenizer.json"))
    whole = [tokenizer.encode(line).ids for line in lines]
    # The short text is one row; the long one's tokens fill windows of 6, none dropped.
    assert ids.shape[1] == 6 and len(ids) == 1 + -(-len(whole[1]) // 6)
    assert ids[0][mask[0].bool()].tolist() == whole[0]
    assert ids[1:][mask[1:].bool()].tolist() == whole[1]


@pytest.mark.parametrize(("lines", "phrase"), [
    (['{"txt": "x"}', '{"text": "y"}'], 'no string field "text"'),
    (["not json", "{}"], "is not JSON"),
    (['{"text": "only one"}'], "at least 2 are needed"),
])
def test_bad_jsonl_is_refused_naming_the_line(folders, tmp_path, lines, phrase) -> None:
    config = CompressionConfig.parse(FAST)
    loaded = load_checkpoint(folders["sentence"], tmp_path, 16)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=phrase):
        checkpoint_data(loaded, path, config.data, seed=0)


def test_text_data_needs_the_checkpoints_tokenizer(folders, tmp_path) -> None:
    folder = copy_of(folders, "sentence", tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json") as caught:
        compressor.compress(folder, FAST, data=write_text(tmp_path / "t.txt"),
                            out_dir=tmp_path / "out")
    assert "tokenizer.save_pretrained" in caught.value.message


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


REFUSALS = {
    "remote code": (lambda f: _edit_config(f, auto_map={"AutoModel": "modeling_evil.EvilModel"}),
                    UnsafeModelError, "auto_map"),
    "unknown architecture": (lambda f: _edit_config(f, architectures=["EvilModel"]),
                             ModelFormatError, "does not have"),
    "no architecture": (lambda f: _edit_config(f, architectures=None), ModelFormatError,
                        "exactly one"),
    "planted pickle": (lambda f: (f / "pytorch_model.bin").write_bytes(
        b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR."), UnsafeModelError,
        "safe_serialization=True"),
    "pickle under another name": (lambda f: (f / "extra.dat").write_bytes(
        b"\x80\x05\x95\x00"), UnsafeModelError, "a pickle"),
    "no safetensors": (lambda f: (f / "model.safetensors").unlink(), ModelFormatError,
                       "save_pretrained"),
    "weights of another class": (
        lambda f: _edit_config(f, architectures=["BertForMaskedLM"]), ModelFormatError,
        "missing"),
    "shard outside the folder": (lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../model.safetensors"}})), UnsafeModelError,
        "shards must be"),
    "no config": (lambda f: (f / "config.json").unlink(), ModelFormatError, "no config.json"),
    "no pooling settings": (lambda f: (f / "1_Pooling" / "config.json").unlink(),
                            ModelFormatError, "1_Pooling/config.json is missing"),
    "a link": (lambda f: (f / "vocab.txt").symlink_to("/etc/passwd"), UnsafeModelError,
               "links are refused"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_checkpoint_is_refused_saying_what_to_do(folders, tmp_path, case) -> None:
    spoil, error, phrase = REFUSALS[case]
    folder = copy_of(folders, "sentence", tmp_path)
    spoil(folder)
    with pytest.raises(error, match=phrase):
        compressor.compress(folder, FAST, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_a_torch_save_pickle_alone_is_refused_with_the_safetensors_recipe(
    folders, tmp_path
) -> None:
    folder = copy_of(folders, "classifier", tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError) as caught:
        compressor.compress(folder, FAST, out_dir=tmp_path / "out")
    assert "pytorch_model.bin" in caught.value.message
    assert "model.save_pretrained(folder, safe_serialization=True)" in caught.value.message


def test_a_zip_slip_archive_is_refused_and_writes_nothing_outside(folders, tmp_path) -> None:
    archive = zip_folder(folders["sentence"], tmp_path / "upload.zip")
    with zipfile.ZipFile(archive, "a") as files:
        files.writestr("../../escaped.txt", "gotcha")
    out = tmp_path / "jobs" / "out"
    with pytest.raises(UnsafeModelError, match="zip-slip"):
        compressor.compress(archive, FAST, out_dir=out)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not any(p.name.startswith(".checkpoint-") for p in out.iterdir())


def test_a_pt2_zip_is_not_taken_for_a_checkpoint(tmp_path) -> None:
    from tests.support.tiny_models import make_pt2

    assert not is_checkpoint(make_pt2("mlp", tmp_path / "mlp.pt2"))
    assert is_checkpoint(tmp_path)  # a folder is


def test_token_type_ids_are_left_out_when_the_tokenizer_does_not_give_them(
    folders, tmp_path
) -> None:
    folder = copy_of(folders, "classifier", tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(folder, tmp_path, 8)
    assert [s.name for s in loaded.specs] == ["input_ids", "attention_mask"]
    assert list(loaded.program.graph_signature.user_inputs) == ["input_ids", "attention_mask"]


def test_the_original_and_the_compressed_model_are_freed_before_the_folder_is_reloaded(
        folders, tmp_path, monkeypatch) -> None:
    from compressor.export import huggingface

    alive: dict[str, weakref.ref] = {}
    checked: list[dict[str, bool]] = []
    write, check = huggingface.write_checkpoint, huggingface.check_checkpoint

    def writing(checkpoint, module, folder):
        alive["original"] = weakref.ref(checkpoint.hf_model)
        alive["compressed"] = weakref.ref(module)
        write(checkpoint, module, folder)

    def checking(*args, **kwargs):
        gc.collect()
        checked.append({name: ref() is not None for name, ref in alive.items()})
        return check(*args, **kwargs)

    monkeypatch.setattr(huggingface, "write_checkpoint", writing)
    monkeypatch.setattr(huggingface, "check_checkpoint", checking)
    result = compressor.compress(folders["classifier"], {**FAST, "finetune": {"steps": 0}},
                                 out_dir=tmp_path / "out")
    assert checked == [{"original": False, "compressed": False}]
    assert result.report["onnx_parity"]["huggingface"]["passed"]


@pytest.mark.slow
def test_a_gpt2_folder_has_every_conv1d_compressed_and_written_back_in_its_own_layout(
    tmp_path,
) -> None:
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    folder = save_checkpoint("gpt2", tmp_path / "gpt2")
    original = GPT2LMHeadModel.from_pretrained(folder).eval()
    conv1d = {name: module for name, module in original.named_modules()
              if isinstance(module, Conv1D)}
    assert len(conv1d) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of two blocks
    config = {**FAST, "method": "lowrank", "ratio": 0.5, "allocation": "uniform"}
    result = compressor.compress(folder, config, data=write_text(tmp_path / "lines.txt"),
                                 out_dir=tmp_path / "out")
    report = result.report
    planned = {layer["name"].removeprefix("model."): layer for layer in report["plan"]["layers"]}
    for name, module in conv1d.items():  # every Conv1D planned, and compressed
        layer = planned[name]
        fan_in, fan_out = module.weight.shape  # stored (in, out)
        assert layer["kind"] == "addmm" and layer["shape"] == [fan_out, fan_in], layer
        assert layer["method"] == "lowrank" and layer["size"] < min(fan_in, fan_out), layer
    assert report["plan"]["skipped"] == []
    assert planned["lm_head"]["tied_embedding"]  # the tied table: compressed once
    assert report["plan"]["kept_weights"] < report["plan"]["targeted_weights"]
    assert report["parameters"]["factorized_form"] < report["parameters"]["before"]
    assert report["onnx_parity"]["passed"] and report["onnx_parity"]["huggingface"]["passed"]
    # The folder written back loads in transformers, computes what model.onnx computes, and
    # holds each Conv1D as the materialized A @ B in the checkpoint's own (in, out) layout.
    reloaded = GPT2LMHeadModel.from_pretrained(unzip(tmp_path / "out" / "model-hf.zip",
                                                     tmp_path / "small")).eval()
    ids, mask = some_tokens(2, 7)
    inputs, outputs, logits = onnx_run(result.model_path, ids, mask)
    assert inputs == ["input_ids", "attention_mask"] and outputs == ["logits"]
    with torch.no_grad():
        expected = reloaded(input_ids=ids, attention_mask=mask, use_cache=False).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-3)
    for name, module in conv1d.items():
        written = reloaded.get_submodule(name).weight.detach()
        assert written.shape == module.weight.shape
        assert not torch.allclose(written, module.weight)
        rank = torch.linalg.matrix_rank(written, rtol=1e-4)  # float32 rounding is no direction
        assert int(rank) <= planned[name]["size"], name
