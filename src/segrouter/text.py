"""Tokenizers and the prompt format shared by every dataset and LLM.

A real LLM brings its own tokenizer (a local HF directory). A randomly initialised LLM gets a word-level
tokenizer over the dataset's closed vocabulary, so tiny models see short sequences and learn fast. Either
way the tokenizer gains the special tokens the model relies on: one ``<image>`` placeholder (replaced by the
visual tokens) and the mask tokens (``[SEG]``, or ``[SEG0]..[SEGk]`` for PSALM-style multi-token prompts).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from segrouter.errors import SegrouterError

IMAGE_TOKEN = "<image>"
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"


def mask_token_names(num_mask_tokens: int) -> list[str]:
    return ["[SEG]"] if num_mask_tokens == 1 else [f"[SEG{i}]" for i in range(num_mask_tokens)]


def build_tokenizer(path: str | None, vocabulary: list[str], num_mask_tokens: int) -> PreTrainedTokenizerBase:
    """Load the LLM's tokenizer from ``path``, or build a word-level one over ``vocabulary``."""
    specials = [IMAGE_TOKEN, *mask_token_names(num_mask_tokens)]
    if path:
        if not Path(path).is_dir():
            raise SegrouterError(f"tokenizer/LLM directory not found: {path}",
                                 fix="set model.llm.path to a local HF directory")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = sorted({w for w in vocabulary if w})
        vocab = {t: i for i, t in enumerate([PAD, UNK, BOS, EOS, *words])}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)
    tok.add_special_tokens({"additional_special_tokens": specials})  # type: ignore[arg-type]
    tok.padding_side = "right"
    return tok


def render_answer(answer: str, mask_tokens: str, target: str | None) -> str:
    """The answer text. ``{target}`` (a name for the referred object, e.g. "red circle") is a training-only
    signal: it follows the mask tokens, so causal attention keeps it out of their states, and without a
    target (evaluation, predict, datasets that give none) the answer is cut where ``{target}`` starts."""
    if "{target}" in answer and target is None:
        answer = answer[: answer.index("{target}")].rstrip()
    return answer.format(mask_tokens=mask_tokens, target=target)


def encode_prompt(tok: PreTrainedTokenizerBase, expression: str, prompt: str) -> list[int]:
    """Token ids of the prompt with the image placeholder: where the template says ``{image}`` (as LLaVA's
    conversation does), else first. No BOS: :func:`encode_example` and generation add it."""
    text = prompt.format(expression=expression, image=IMAGE_TOKEN)
    return tok.encode(text if "{image}" in prompt else f"{IMAGE_TOKEN} {text}", add_special_tokens=False)


def encode_example(
    tok: PreTrainedTokenizerBase,
    expression: str,
    prompt: str,
    answer: str,
    num_mask_tokens: int,
    target: str | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Token ids, LM labels and name labels for ``[BOS] <image> prompt answer [EOS]`` (the image where the prompt
    says ``{image}``, as in LLaVA's conversation template, if it does). Labels cover the
    answer only; name labels hold the ids of the tokens that spell ``target`` in the answer (found by
    character offsets, so any fast tokenizer works) and -100 elsewhere, for the ``name_acc`` probe."""
    mask_str = " ".join(mask_token_names(num_mask_tokens))
    prefix = encode_prompt(tok, expression, prompt)
    reply_text = render_answer(answer, mask_str, target)
    reply = tok.encode(reply_text, add_special_tokens=False)
    names = [-100] * len(reply)
    if target is not None and "{target}" in answer and tok.is_fast:
        start = len(answer[: answer.index("{target}")].format(mask_tokens=mask_str))
        spans = tok(reply_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        names = [t if s < start + len(target) and e > start else -100 for t, (s, e) in zip(reply, spans, strict=True)]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids = bos + prefix + reply + eos
    labels = [-100] * (len(bos) + len(prefix)) + reply + eos
    return ids, labels, [-100] * (len(bos) + len(prefix)) + names + [-100] * len(eos)


def template_words(prompt: str, answer: str) -> list[str]:
    """Plain words of the prompt/answer templates (they join the dataset vocabulary)."""
    text = prompt.replace("{expression}", " ").replace("{image}", " ") + " "
    text += answer.replace("{mask_tokens}", " ").replace("{target}", " ")
    return text.split()
