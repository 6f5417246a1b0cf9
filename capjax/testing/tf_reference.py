"""The TensorFlow tutorial's captioning model, in Keras, as a test reference.

Written from the tutorial's equations with real Keras layers (`Dense`,
`Embedding`, `GRU`), trained the tutorial's way: a Python loop over time steps
that calls the decoder once per token, teacher forcing, W1 on the features
recomputed at every step. `carry_gru_state=True` passes the previous state to
the GRU (capjax's default); False is the tutorial verbatim.

The module uses `tf.keras`: Keras 3, or Keras 2 (the `tf_keras` package) in a
process started with TF_USE_LEGACY_KERAS=1. `save_tutorial_run` trains and
saves a model, its tokenizer and its outputs the way the tutorial does.
"""

import json
import os
import pathlib
from typing import Any

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras: Any = tf.keras


class BahdanauAttention(keras.Model):
  def __init__(self, units):
    super().__init__()
    self.W1 = keras.layers.Dense(units)
    self.W2 = keras.layers.Dense(units)
    self.V = keras.layers.Dense(1)

  def call(self, features, hidden):
    hidden_with_time_axis = tf.expand_dims(hidden, 1)
    attention_hidden_layer = tf.nn.tanh(
      self.W1(features) + self.W2(hidden_with_time_axis)
    )
    score = self.V(attention_hidden_layer)
    attention_weights = tf.nn.softmax(score, axis=1)
    context_vector = tf.reduce_sum(attention_weights * features, axis=1)
    return context_vector, attention_weights


class CNN_Encoder(keras.Model):
  def __init__(self, embedding_dim):
    super().__init__()
    self.fc = keras.layers.Dense(embedding_dim)

  def call(self, x):
    return tf.nn.relu(self.fc(x))


class RNN_Decoder(keras.Model):
  def __init__(self, embedding_dim, units, vocab_size, carry_gru_state=False):
    super().__init__()
    self.units = units
    self.carry_gru_state = carry_gru_state
    self.embedding = keras.layers.Embedding(vocab_size, embedding_dim)
    self.gru = keras.layers.GRU(
      self.units,
      return_sequences=True,
      return_state=True,
      recurrent_initializer='glorot_uniform',
    )
    self.fc1 = keras.layers.Dense(self.units)
    self.fc2 = keras.layers.Dense(vocab_size)
    self.attention = BahdanauAttention(self.units)

  def call(self, x, features, hidden):
    context_vector, attention_weights = self.attention(features, hidden)
    x = self.embedding(x)
    x = tf.concat([tf.expand_dims(context_vector, 1), x], axis=-1)
    if self.carry_gru_state:
      output, state = self.gru(x, initial_state=hidden)
    else:
      output, state = self.gru(x)
    x = self.fc1(output)
    x = tf.reshape(x, (-1, x.shape[2]))
    x = self.fc2(x)
    return x, state, attention_weights

  def reset_state(self, batch_size):
    return tf.zeros((batch_size, self.units))


def build(
  vocab_size,
  embedding_dim,
  units,
  feature_dim,
  num_positions,
  carry_gru_state,
  seed=0,
):
  """Builds the encoder and decoder with seeded random weights."""
  keras.utils.set_random_seed(seed)
  encoder = CNN_Encoder(embedding_dim)
  decoder = RNN_Decoder(embedding_dim, units, vocab_size, carry_gru_state)
  features = encoder(tf.zeros((1, num_positions, feature_dim)))
  decoder(tf.zeros((1, 1), tf.int32), features, decoder.reset_state(1))
  return encoder, decoder


def perturb_biases(encoder, decoder, scale=0.1, seed=1):
  """Random biases: Keras starts them at zero, which would hide bias bugs."""
  rng = np.random.default_rng(seed)
  for variable in encoder.trainable_variables + decoder.trainable_variables:
    if 'bias' in variable.path:
      variable.assign(rng.normal(scale=scale, size=variable.shape))


def teacher_forced(encoder, decoder, features, tokens):
  """The tutorial's loop: logits (B, T-1, V), attention (B, T-1, L)."""
  tokens = tf.convert_to_tensor(tokens)
  hidden = decoder.reset_state(tokens.shape[0])
  x = encoder(features)
  dec_input = tokens[:, :1]
  logits, attention = [], []
  for i in range(1, tokens.shape[1]):
    predictions, hidden, weights = decoder(dec_input, x, hidden)
    logits.append(predictions)
    attention.append(weights[..., 0])
    dec_input = tokens[:, i : i + 1]
  return tf.stack(logits, axis=1), tf.stack(attention, axis=1)


def masked_loss(tokens, logits):
  """Cross-entropy averaged over the real (non-pad) target tokens."""
  targets = tokens[:, 1:]
  per_token = keras.losses.sparse_categorical_crossentropy(
    targets, logits, from_logits=True
  )
  mask = tf.cast(targets != 0, per_token.dtype)
  return tf.reduce_sum(per_token * mask) / tf.reduce_sum(mask)


def variables(encoder, decoder):
  """The models' trainable variables by tutorial name (capjax.convert's)."""
  gru = decoder.gru.cell
  attention = decoder.attention
  named = {
    'encoder/fc/kernel': encoder.fc.kernel,
    'encoder/fc/bias': encoder.fc.bias,
    'decoder/embedding/embeddings': decoder.embedding.embeddings,
    'decoder/gru/kernel': gru.kernel,
    'decoder/gru/recurrent_kernel': gru.recurrent_kernel,
    'decoder/gru/bias': gru.bias,
  }
  for prefix, layer in [
    ('decoder/fc1', decoder.fc1),
    ('decoder/fc2', decoder.fc2),
    ('decoder/attention/W1', attention.W1),
    ('decoder/attention/W2', attention.W2),
    ('decoder/attention/V', attention.V),
  ]:
    named[f'{prefix}/kernel'] = layer.kernel
    named[f'{prefix}/bias'] = layer.bias
  return named


def weights(encoder, decoder):
  """Current values of `variables` as NumPy arrays."""
  return {name: v.numpy() for name, v in variables(encoder, decoder).items()}


# --- The tutorial's training, checkpoint, tokenizer and evaluate() ----------

# The tutorial's Tokenizer filters: not '<' or '>', which its special words
# hold.
TOKENIZER_FILTERS = '!"#$%&()*+.,-/:;=?@[\\]^_`{|}~ '


def tutorial_tokenizer(captions, top_k):
  """The tutorial's Keras Tokenizer fit on captions, with '<pad>' as id 0."""
  tokenizer = keras.preprocessing.text.Tokenizer(
    num_words=top_k, oov_token='<unk>', filters=TOKENIZER_FILTERS
  )
  tokenizer.fit_on_texts(captions)
  tokenizer.word_index['<pad>'] = 0
  tokenizer.index_word[0] = '<pad>'
  return tokenizer


def train_step(encoder, decoder, optimizer, features, tokens):
  """The tutorial's train step: teacher forcing, then one optimizer step."""
  # The tutorial's variable order: Keras 3 checkpoints key variables by it.
  trainable = encoder.trainable_variables + decoder.trainable_variables
  with tf.GradientTape() as tape:
    logits, _ = teacher_forced(encoder, decoder, features, tokens)
    loss = masked_loss(tokens, logits)
  optimizer.apply_gradients(zip(tape.gradient(loss, trainable), trainable))
  return loss


def greedy_caption(encoder, decoder, tokenizer, features_LD, max_length):
  """The tutorial's evaluate() with argmax: words up to and with '<end>'."""
  hidden = decoder.reset_state(batch_size=1)
  features = encoder(features_LD[None])
  dec_input = tf.constant([[tokenizer.word_index['<start>']]])
  result = []
  for _ in range(max_length):
    predictions, hidden, _ = decoder(dec_input, features, hidden)
    predicted_id = int(tf.argmax(predictions[0]))
    result.append(tokenizer.index_word[predicted_id])
    if result[-1] == '<end>':
      break
    dec_input = tf.constant([[predicted_id]])
  return result


def save_tutorial_run(
  directory,
  captions,
  top_k,
  embedding_dim,
  units,
  feature_dim,
  num_positions,
  train_steps,
  learning_rate,
  legacy_optimizer=False,
  seed=0,
):
  """Trains the tutorial's model and saves it as the tutorial does.

  Image i has a random feature grid, features[i], and the caption
  captions[i] ('<start> ... <end>'). Writes into `directory`:

    checkpoints/train/  tf.train.Checkpoint(encoder, decoder, optimizer), by
                        the tutorial's tf.train.CheckpointManager
    tokenizer.json      tokenizer.to_json()
    reference.npz       features (N, L, D); tokens (N, T), the tokenizer's
                        ids padded with 0; logits (N, T-1, top_k + 1) of the
                        trained model, teacher-forced
    greedy.json         each image's caption by the tutorial's evaluate()
                        (argmax), up to T words with '<end>'

  legacy_optimizer takes Keras 2's OptimizerV2 Adam, which TF <= 2.10 had.
  """
  directory = pathlib.Path(directory)
  tokenizer = tutorial_tokenizer(captions, top_k)
  sequences = tokenizer.texts_to_sequences(captions)
  tokens = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
  for row, sequence in zip(tokens, sequences):
    row[: len(sequence)] = sequence
  # Each image's grid: a vector of its own at every position, plus noise, so
  # that a few steps learn to tell the images apart.
  rng = np.random.default_rng(seed)
  features = (
    3 * rng.random((len(captions), 1, feature_dim))
    + rng.random((len(captions), num_positions, feature_dim))
  ).astype(np.float32)
  encoder, decoder = build(
    top_k + 1,
    embedding_dim,
    units,
    feature_dim,
    num_positions,
    carry_gru_state=False,
    seed=seed,
  )
  adam = (
    keras.optimizers.legacy.Adam if legacy_optimizer else keras.optimizers.Adam
  )
  optimizer = adam(learning_rate=learning_rate)
  # Eager: tracing the tutorial's per-token loop takes longer than a few
  # steps do.
  for _ in range(train_steps):
    train_step(encoder, decoder, optimizer, features, tokens)

  ckpt = tf.train.Checkpoint(
    encoder=encoder, decoder=decoder, optimizer=optimizer
  )
  tf.train.CheckpointManager(
    ckpt, str(directory / 'checkpoints' / 'train'), max_to_keep=5
  ).save()
  (directory / 'tokenizer.json').write_text(tokenizer.to_json())
  logits, _ = teacher_forced(encoder, decoder, features, tokens)
  np.savez(
    directory / 'reference.npz',
    features=features,
    tokens=tokens,
    logits=logits.numpy(),
  )
  greedy = [
    greedy_caption(encoder, decoder, tokenizer, f, tokens.shape[1])
    for f in features
  ]
  (directory / 'greedy.json').write_text(json.dumps(greedy))
