"""Byte-level BPE trained on the corpus itself.

Byte-level (GPT-2 style) so that every string round-trips exactly:
decode(encode(x)) == x, whitespace and all, which matters for code where
indentation is syntax. No normalizer and add_prefix_space=False for the same
reason. A small vocabulary (2048 by default) keeps the embedding and
unembedding small relative to the sparse transformer between them.
"""

import time

from absl import logging
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import Tokenizer
from tokenizers import trainers

EOT = '<|endoftext|>'
MIN_VOCAB = 256 + 1  # Every byte, then EOT: the smallest vocabulary trained.


def _with_literal_specials(tokenizer):
  """Makes `encode` treat the text '<|endoftext|>' as ordinary bytes.

  Only the data pipeline inserts EOT (by id, between documents); a file that
  merely mentions the string must not be cut in two. The flag is not saved in
  tokenizer.json, so it is set on every tokenizer handed out.
  """
  tokenizer.encode_special_tokens = True
  return tokenizer


def train(texts, vocab_size):
  """Trains a tokenizer on an iterable of strings (the train split only)."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[EOT],
      # All 256 bytes, seen or not, so no validation text is ever unencodable.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  logging.info('Training byte-level BPE, vocab_size=%d.', vocab_size)
  start = time.time()
  tokenizer.train_from_iterator(texts, trainer=trainer)
  logging.info('Trained BPE in %.1fs: %d tokens.', time.time() - start,
               tokenizer.get_vocab_size())
  if tokenizer.get_vocab_size() < vocab_size:
    logging.warning('Corpus too small for %d tokens; vocab has %d.',
                    vocab_size, tokenizer.get_vocab_size())
  return _with_literal_specials(tokenizer)


def load(path):
  return _with_literal_specials(Tokenizer.from_file(path))


def eot_id(tokenizer):
  return tokenizer.token_to_id(EOT)
