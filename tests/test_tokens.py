"""steerkern.tokens: one tokenisation for extraction, training and evaluation (no token a
tokenizer appends after the text, the BOS it adds unless the text starts with it), the
position-table check, and answer tokens read in context."""

import warnings

import pytest
import torch
import transformers

from steerkern.capture import _tokenize, capture
from steerkern.items import binary_items, render
from steerkern.sweep import _encode, score_rows
from steerkern.tokens import check_fits_positions, position_limit, text_token_ids

PAIRS = [("I love cheese, it is wonderful", "I hate cheese, it is awful"),
         ("The food was great", "The food was bad")]


@pytest.fixture(scope="module")
def smol_tokenizers(default_model):
    """The default model's tokenizer as loaded, and the same files with add_eos_token=True and
    with add_bos_token=True (a BOS its chat template does not write)."""
    from steerkern.models import default_model_path

    path = default_model_path()
    plain = transformers.AutoTokenizer.from_pretrained(path)  # its own copy: a test changes it
    with_eos = transformers.AutoTokenizer.from_pretrained(path, add_eos_token=True)
    with_bos = transformers.AutoTokenizer.from_pretrained(path, add_bos_token=True, bos_token="<|endoftext|>")
    assert with_eos("hi")["input_ids"][-1] == with_eos.eos_token_id  # the setting under test
    assert with_bos("hi")["input_ids"][0] == with_bos.bos_token_id
    return plain, with_eos, with_bos


@pytest.fixture(scope="module")
def smol_vocab_model():
    """A tiny random Llama with the default tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def test_no_token_is_appended_after_a_text_and_a_bos_is_added_once(smol_tokenizers):
    plain, with_eos, with_bos = smol_tokenizers
    text = "The food was great"
    own = plain(text, add_special_tokens=False)["input_ids"]
    full = with_eos(text)["input_ids"]  # some releases also give this tokenizer a BOS
    assert full[-1] == with_eos.eos_token_id and full[-1 - len(own):-1] == own
    assert text_token_ids(with_eos, [text]) == [full[:-1]]
    assert text_token_ids(with_bos, [text]) == [[with_bos.bos_token_id] + own]
    assert text_token_ids(with_bos, [with_bos.bos_token + text]) == [[with_bos.bos_token_id] + own]
    assert text_token_ids(with_eos, ["", text])[0] == full[:-1 - len(own)]  # the leading specials only


class _FixedTokenizer:
    """Returns the ids it was given for each text, whatever add_special_tokens says."""

    bos_token = None
    chat_template = None
    pad_token_id = 0
    eos_token_id = None

    def __init__(self, ids: dict):
        self.ids = ids

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.ids[text]}


def test_extraction_and_scoring_ignore_an_appended_eos(smol_tokenizers, smol_vocab_model):
    """Read and scored at the text's last token: the tokenizer's ids without the EOS it appends."""
    _, with_eos, _ = smol_tokenizers
    texts = [t for pair in PAIRS for t in pair]
    without_eos = {t: with_eos(t)["input_ids"][:-1] for t in texts}
    expected = capture(smol_vocab_model, _FixedTokenizer(without_eos), texts, [1], progress=False)[1]
    torch.testing.assert_close(capture(smol_vocab_model, with_eos, texts, [1], progress=False)[1], expected)
    with_eos.chat_template = None  # rendered as "{text}\nAnswer:", tokenised with specials
    items = binary_items(with_eos, [{"prompt": "Is the sky blue?", "label": 1}, {"prompt": "Is fire cold?", "label": -1}])
    got = score_rows(smol_vocab_model, with_eos, [], items, [(-1, 0.0)], share_prefill=False)[0]
    for item, score in zip(items, got):
        ids = with_eos(render(with_eos, item.question, item.prefix))["input_ids"][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(smol_vocab_model(torch.tensor([ids])).logits[0, -1].double(), -1)
        want = torch.logsumexp(logp[list(item.positive)], 0) - torch.logsumexp(logp[list(item.negative)], 0)
        assert score == pytest.approx(float(want), abs=1e-5)


def test_extraction_and_evaluation_read_a_rendered_text_alike(smol_tokenizers, smol_vocab_model):
    """With a BOS the tokenizer adds but the chat template does not write, both add it."""
    _, _, with_bos = smol_tokenizers
    text = render(with_bos, "Is the sky blue?")
    ids, mask = _encode(with_bos, [text], "cpu")
    assert ids[0].tolist() == _tokenize(smol_vocab_model, with_bos, [text])[0]
    assert ids[0, 0] == with_bos.bos_token_id


def _tiny(arch: str, positions: int):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=49152, n_embd=32, n_layer=2, n_head=4, n_positions=positions)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=positions)
    return transformers.LlamaForCausalLM(config).eval()


def test_texts_beyond_a_learned_position_table_are_refused_by_name(smol_tokenizers):
    import steerkern

    tokenizer = smol_tokenizers[0]
    gpt2, llama = _tiny("gpt2", 16), _tiny("llama", 16)
    assert position_limit(gpt2) == (16, True) and position_limit(llama) == (16, False)
    long = "word " * 30
    pairs = [("short one", "short two"), ("fine", long)]
    with pytest.raises(ValueError, match=r"pairs\[1\] \(rejected\).*16 learned positions"):
        steerkern.extract(gpt2, tokenizer, pairs, layers=[0], progress=False)
    with pytest.warns(UserWarning, match=r"pairs\[1\] \(rejected\).*max_position_embeddings=16"):
        steerkern.extract(llama, tokenizer, pairs, layers=[0], progress=False)
    check_fits_positions(gpt2, [10], str, extra=6)  # exactly full: fine
    with pytest.raises(ValueError, match="seq has 10 tokens \\(\\+7 generated\\)"):
        check_fits_positions(gpt2, [10], lambda i: "seq", extra=7)
    assert not any(m._forward_hooks for m in gpt2.modules())


def test_evaluation_refuses_prompts_and_generations_past_learned_positions(smol_tokenizers):
    from steerkern.sweep import generate_rows

    tokenizer = smol_tokenizers[0]
    gpt2 = _tiny("gpt2", 64)
    items = binary_items(tokenizer, [{"prompt": "Is it?", "label": 1}, {"prompt": "long " * 80, "label": 1}])
    with pytest.raises(ValueError, match=r"prompts\[1\] 'long long[ .long]*long ' has \d+ tokens.*64 learned positions"):
        score_rows(gpt2, tokenizer, [], items, [(-1, 0.0)])
    with pytest.raises(ValueError, match=r"generation prompt 'Hi'.*\(\+64 generated\).*lower max_new_tokens"):
        generate_rows(gpt2, tokenizer, [], ["Hi"], [(-1, 0.0)], max_new_tokens=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_rows(gpt2, tokenizer, [], ["Hi"], [(-1, 0.0)], max_new_tokens=2)


def _sentencepiece_tokenizer():
    """A Llama-2-style tokenizer built offline: a Unigram vocabulary with both "▁A" and "A"
    pieces and a Metaspace pre-tokenizer that prepends "▁" to the text's first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["Yes", "No", "yes", "no", "YES", "NO", "Answer", "Is", "the", "sky", "blue", "Pick", "cats", "dogs"]
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    for word in words:
        pieces += [("▁" + word, -2.0), (word, -2.5)]
    for char in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz()?:.\n":
        pieces += [("▁" + char, -4.0), (char, -5.0)]
    pieces = list(dict(pieces).items())
    core = Tokenizer(models.Unigram(pieces, unk_id=0))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.mark.parametrize("template", [None, "zephyr"])
def test_answer_tokens_include_the_piece_a_sentencepiece_tokenizer_predicts_in_context(template):
    """encode("A") alone gives "▁A", but after "(" (or a template ending in a newline) the text
    "A" is the bare piece "A": both count as the answer."""
    tokenizer = _sentencepiece_tokenizer()
    if template:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
        tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                                   "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    entries = [({"question": "Pick one.\n (A) cats\n (B) dogs", "answer_matching_behavior": " (A)",
                 "answer_not_matching_behavior": " (B)"}, "A)", "B)"),
               ({"prompt": "Is the sky blue?", "label": 1}, "Yes", "No")]
    for entry, yes, no in entries:
        item, = binary_items(tokenizer, [entry])
        context = render(tokenizer, item.question, item.prefix)
        before = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        for answer, side in ((yes, item.positive), (no, item.negative)):
            predicted = tokenizer(context + answer, add_special_tokens=False)["input_ids"][before]
            assert predicted in side, (tokenizer.convert_ids_to_tokens(predicted), side)
        assert not set(item.positive) & set(item.negative)
