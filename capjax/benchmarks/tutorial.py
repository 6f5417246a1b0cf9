"""The TensorFlow tutorial's training step and greedy evaluate(), as baselines.

Both use capjax.testing.tf_reference's Keras model with carry_gru_state=False,
the tutorial verbatim, and run on the CPU (TensorFlow never sees a GPU).
"""

import numpy as np
import tensorflow as tf

from capjax.benchmarks import workload
from capjax.data import vocab as vocab_lib
from capjax.testing import tf_reference


class TutorialTrainer:
  """The tutorial's `train_step`: a tf.function around a loop over tokens."""

  def __init__(self, sizes: workload.Sizes = workload.TUTORIAL, seed: int = 0):
    self.encoder, self.decoder = tf_reference.build(
      sizes.vocab_size,
      sizes.embedding_dim,
      sizes.units,
      sizes.feature_dim,
      sizes.num_locations,
      carry_gru_state=False,
      seed=seed,
    )
    self._optimizer = tf.keras.optimizers.Adam()
    self._cross_entropy = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction='none'
    )
    # One trace per caption length, as the tutorial's own function retraced.
    self._step = tf.function(self._train_step)

  def _loss(self, targets, logits):
    """The tutorial's loss_function: batch mean of the masked cross-entropy."""
    mask = tf.cast(tf.math.not_equal(targets, 0), tf.float32)
    return tf.reduce_mean(self._cross_entropy(targets, logits) * mask)

  def _train_step(self, features, tokens):
    loss = 0.0
    hidden = self.decoder.reset_state(batch_size=tokens.shape[0])
    dec_input = tokens[:, :1]
    with tf.GradientTape() as tape:
      encoded = self.encoder(features)
      for i in range(1, tokens.shape[1]):
        logits, hidden, _ = self.decoder(dec_input, encoded, hidden)
        loss += self._loss(tokens[:, i], logits)
        dec_input = tokens[:, i : i + 1]
    variables = (
      self.encoder.trainable_variables + self.decoder.trainable_variables
    )
    gradients = tape.gradient(loss, variables)
    self._optimizer.apply_gradients(zip(gradients, variables))
    return loss

  def __call__(self, features, tokens) -> np.ndarray:
    return self._step(features, tokens).numpy()


def make_tutorial_evaluate(max_len: int):
  """The tutorial's `evaluate()` (argmax) with its eager Keras decoder.

  Returns features_NLD -> tokens_NT, one image at a time as the tutorial.
  """
  encoder, decoder = tf_reference.build(
    workload.VOCAB_SIZE,
    workload.EMBEDDING_DIM,
    workload.UNITS,
    workload.FEATURE_DIM,
    workload.NUM_LOCATIONS,
    carry_gru_state=False,
  )

  def evaluate(features_NLD: np.ndarray) -> np.ndarray:
    tokens_NT = np.zeros((len(features_NLD), max_len), np.int32)
    for n, features_LD in enumerate(features_NLD):
      hidden = decoder.reset_state(batch_size=1)
      encoded = encoder(features_LD[None])
      dec_input = tf.constant([[vocab_lib.Vocab.start_id]])
      for t in range(max_len):
        predictions, hidden, _ = decoder(dec_input, encoded, hidden)
        predicted_id = int(tf.argmax(predictions[0]))
        tokens_NT[n, t] = predicted_id
        if predicted_id == vocab_lib.Vocab.end_id:
          break
        dec_input = tf.constant([[predicted_id]])
    return tokens_NT

  return evaluate
