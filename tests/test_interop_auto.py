"""transformers' Auto classes on turbos directories: loading by name, the same logits as ours,
generate() token for token against our greedy decoding, the text-generation pipeline, the
HF-format directory (save_hf) and both save_pretrained round trips, registration by ``import
turbos`` alone, and unknown config keys refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from serve_helpers import greedy_alone, save_model_dir, tiny_model
from turbos.config import ConfigError
from turbos.data.tokenizer import END_TOKEN, EOS_ID
from turbos.interop.auto import TurboSHFConfig, TurboSHFForCausalLM, save_hf
from turbos.model import HybridCache, TurboSForCausalLM
from turbos.safetensors_io import save_state_dict
from turbos.serve.chat_template import render_chat

PROMPTS = ["12+34=", "7*6 is"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def turbos_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("turbos"))


@pytest.fixture(scope="module")
def ours(turbos_dir) -> TurboSForCausalLM:
    return TurboSForCausalLM.from_pretrained(turbos_dir)


@pytest.fixture(scope="module")
def hf(turbos_dir) -> TurboSHFForCausalLM:
    return AutoModelForCausalLM.from_pretrained(turbos_dir)


@pytest.fixture(scope="module")
def left_padded(turbos_dir) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(turbos_dir, padding_side="left")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all(), "the prompts should need padding"
    return dict(batch)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def our_greedy(
    model: TurboSForCausalLM, ids: torch.Tensor, mask: torch.Tensor, steps: int, use_cache: bool
) -> torch.Tensor:
    """Greedy decoding of a left-padded batch with our model: (b, steps) new tokens."""
    cache = HybridCache(model.config, ids.shape[0]) if use_cache else None
    sequence, step_input, out = ids, ids, []
    for _ in range(steps):
        logits = model(step_input, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        sequence = torch.cat([sequence, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        step_input = token if use_cache else sequence
    return torch.cat(out, dim=1)


def up_to_eos(tokens: list[int]) -> list[int]:
    """generate() pads a row after it emits EOS; compare up to and including the EOS."""
    return tokens[: tokens.index(EOS_ID) + 1] if EOS_ID in tokens else tokens


def test_auto_classes_load_a_turbos_dir_by_name(turbos_dir, ours, hf):
    config = AutoConfig.from_pretrained(turbos_dir)
    assert isinstance(config, TurboSHFConfig) and config.to_turbos() == ours.config
    assert isinstance(hf, TurboSHFForCausalLM)
    assert same_state(hf, ours)  # same keys, weights loaded with no conversion
    assert AutoTokenizer.from_pretrained(turbos_dir).chat_template


def test_logits_and_loss_equal_ours(ours, hf, left_padded):
    ids, mask = left_padded["input_ids"], left_padded["attention_mask"]
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=ids)
        mine = ours(ids, attention_mask=mask, labels=ids)
    assert torch.equal(theirs.logits, mine.logits)
    assert torch.equal(theirs.loss, mine.loss) and torch.equal(theirs.aux_loss, mine.aux_loss)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_matches_our_greedy_batch_with_left_padding(ours, hf, left_padded, use_cache):
    ids, mask = left_padded["input_ids"], left_padded["attention_mask"]
    out = hf.generate(**left_padded, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache)
    expected = our_greedy(ours, ids, mask, NEW_TOKENS, use_cache)
    for row, want in zip(out[:, ids.shape[1] :].tolist(), expected.tolist(), strict=True):
        assert up_to_eos(row) == up_to_eos(want)


def test_generate_one_prompt_equals_greedy_alone(ours, hf, left_padded):
    assert left_padded["attention_mask"][0].all()
    prompt = left_padded["input_ids"][0].tolist()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert up_to_eos(out[0, len(prompt) :].tolist()) == up_to_eos(greedy_alone(ours, prompt, NEW_TOKENS))


def test_sampling_and_beam_search_generate(hf, left_padded):
    greedy = hf.generate(**left_padded, max_new_tokens=NEW_TOKENS, do_sample=False)
    top1 = hf.generate(**left_padded, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    torch.manual_seed(0)
    sampled = hf.generate(**left_padded, max_new_tokens=NEW_TOKENS, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (4, greedy.shape[1])
    beams = {
        use_cache: hf.generate(**left_padded, max_new_tokens=NEW_TOKENS, num_beams=2, use_cache=use_cache)
        for use_cache in (True, False)
    }
    assert torch.equal(beams[True], beams[False])  # the cache follows the beams


def test_text_generation_pipeline(turbos_dir, ours):
    generate = pipeline("text-generation", model=str(turbos_dir))
    tokenizer = generate.tokenizer
    text = generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    expected = up_to_eos(greedy_alone(ours, prompt, NEW_TOKENS))
    assert text == PROMPTS[0] + tokenizer.decode(expected, skip_special_tokens=True)
    chat = generate([{"role": "user", "content": "What is 2+3?"}], max_new_tokens=4)[0]["generated_text"]
    assert chat[-1]["role"] == "assistant"


def test_save_hf_sharded_round_trip(tmp_path, ours, tokenizer):
    directory = save_hf(ours, tokenizer, tmp_path / "hf", max_shard_size=60_000)
    assert len(list(directory.glob("model-*-of-*.safetensors"))) >= 2
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["TurboSHFForCausalLM"] and config["model_type"] == "turbos"
    assert same_state(TurboSForCausalLM.from_pretrained(directory), ours)
    assert same_state(AutoModelForCausalLM.from_pretrained(directory), ours)
    generation = GenerationConfig.from_pretrained(directory)
    assert generation.bos_token_id == ours.config.bos_token_id
    assert generation.pad_token_id == ours.config.pad_token_id
    assert generation.eos_token_id == [ours.config.eos_token_id, tokenizer.token_to_id(END_TOKEN)]
    messages = [
        {"role": "system", "content": "Be brief. /no_think"},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>2+3=5</think>5"},
        {"role": "user", "content": "And 4+4?"},
    ]
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    encoded = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert encoded["input_ids"] == tokenizer.encode(render_chat(messages)).ids


def test_hf_save_pretrained_loads_in_turbos_and_back_with_tied_embeddings(tmp_path, tokenizer):
    model = tiny_model(tokenizer.get_vocab_size(), tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "turbos")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "turbos")
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = torch.tensor([tokenizer.encode(PROMPTS[1]).ids])
    with torch.no_grad():  # same numbers; tensors loaded elsewhere in memory may round differently
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    back = TurboSForCausalLM.from_pretrained(tmp_path / "hf")
    assert back.lm_head.weight is back.model.embed_tokens.weight and same_state(back, model)


def test_fresh_hf_model_has_our_initial_weights(tokenizer):
    config = tiny_model(tokenizer.get_vocab_size()).config
    torch.manual_seed(1)
    hf = TurboSHFForCausalLM(TurboSHFConfig.from_turbos(config))
    torch.manual_seed(1)
    assert same_state(hf, TurboSForCausalLM(config))


def test_import_turbos_registers_the_auto_classes(turbos_dir):
    code = (
        "import sys, turbos\n"
        "assert 'transformers' not in sys.modules, 'import turbos imported transformers'\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(turbos_dir)!r})\n"
        f"AutoTokenizer.from_pretrained({str(turbos_dir)!r})\n"
        "print(type(model).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "TurboSHFForCausalLM"


def test_bookkeeping_keys_are_ignored_and_unknown_keys_refused(tmp_path, turbos_dir, ours):
    shutil.copytree(turbos_dir, tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_cache": True, "auto_map": {}, "torch_dtype": "float32"}))
    assert same_state(TurboSForCausalLM.from_pretrained(path.parent), ours)
    assert AutoConfig.from_pretrained(path.parent).to_turbos() == ours.config
    path.write_text(json.dumps({**config, "num_expert": 8}))
    with pytest.raises(ConfigError, match="unknown config key.*num_expert"):
        TurboSForCausalLM.from_pretrained(path.parent)
    with pytest.raises(ConfigError, match="unknown config key.*num_expert"):
        AutoConfig.from_pretrained(path.parent)


def test_a_checkpoint_missing_weights_is_refused(tmp_path, turbos_dir, ours):
    shutil.copytree(turbos_dir, tmp_path / "model")
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("mixer.A_log")}
    save_state_dict(state, tmp_path / "model")
    with pytest.raises(ValueError, match=r"weight\(s\) missing.*A_log"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model")
