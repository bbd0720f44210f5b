"""The ids of OpenAI's CLIP BPE (Radford et al. 2021; the same in OpenCLIP): the one place they
are written down. Checkpoints that use other ids cannot share a text tower with OpenAI/OpenCLIP."""

CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 (with/without </w>) + 48894 merges + 2 special tokens
CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407
CLIP_PAD_ID = 0  # OpenCLIP pads with 0 (its tokenizer's "!"); harmless: the tower pools at EOT
