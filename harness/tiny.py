"""The tiny in-process models of tests and smoke runs: a seeded, randomly initialised Llama or GPT-2
of two layers with a small BPE tokenizer trained in-process on a fixed text. Their "facts" are
random; they show the mechanics in seconds, with no files and no network.
"""
from __future__ import annotations


import torch

_TINY_CORPUS = (
    "The mother tongue of Danielle Darrieux is French. The capital of France is Paris. "
    "LeBron James plays the sport of basketball. Toko Yasuda plays the guitar. "
    "Apple A5 was created by Apple. The official language of Italy is Italian. "
    "Windows 7 was developed by Microsoft. Rome is the capital of Italy. "
    "Who is the president of the United States? What language does he speak? "
    "The Eiffel Tower is located in Paris, which is in France, a country in Europe. "
    "0123456789 The quick brown fox jumps over the lazy dog. English German Spanish Japanese."
)


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in-process (GPT-2 style: leading space is part of a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.padding_side = "right"
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 2, hidden: int = 64,
               intermediate: int = 128, n_heads: int = 4):
    """A small randomly initialised causal LM and a matching in-process tokenizer.

    Args:
        arch: ``llama`` or ``gpt2``.
        seed: initialisation seed; the same seed gives bit-identical weights.

    Returns:
        (model in float32 on the CPU, eval mode, gradients off; tokenizer).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    vocab = len(tok)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        if arch == "llama":
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                              num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                              max_position_embeddings=256, tie_word_embeddings=True,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
            model = LlamaForCausalLM(cfg)
        elif arch == "gpt2":
            cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=intermediate, n_layer=n_layers, n_head=n_heads,
                             n_positions=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            model = GPT2LMHeadModel(cfg)
        else:
            raise ValueError(f"tiny arch={arch!r}: use 'llama' or 'gpt2'")
    model.eval()
    model.requires_grad_(False)
    return model, tok
