"""Captions -> token ids.

    tokenizer.py   the BPE tokenizer (trained on our captions, or CLIP's released BPE), padding,
                   and the CLI that trains one over shards (`python -m training.text.tokenizer`)
    clip_vocab.py  the token ids of OpenAI's CLIP BPE
"""
