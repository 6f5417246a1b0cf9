"""The PyTorch baseline (capjax.benchmarks.torch_tutorial) against capjax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
  'torch',
  reason='PyTorch is optional (pip install capjax[bench]); only '
  'the PyTorch baseline needs it',
)

# After the importorskip: these import torch.
from capjax.benchmarks import torch_tutorial  # noqa: E402
from capjax.benchmarks import workload  # noqa: E402
from capjax.model import decoding  # noqa: E402
from capjax.model import losses  # noqa: E402
from capjax.training import state as state_lib  # noqa: E402
from capjax.training import step as step_lib  # noqa: E402

SIZES = workload.Sizes(
  vocab_size=60, embedding_dim=16, units=24, num_locations=6, feature_dim=12
)
# Tokens per caption, <start> and <end> included: unsorted, ties, padding.
LENGTHS = (7, 12, 4, 10, 12, 2)
CPU = torch.device('cpu')


@pytest.fixture(autouse=True, scope='module')
def one_thread():
  """At these sizes threads gain nothing, and OpenMP's wait for a busy core
  made each step up to 100x slower on a loaded 2-core machine."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _capjax(seed=0):
  """A Captioner and its parameters, biases random (capjax starts them at
  zero, which would hide a bias put in the wrong place)."""
  model = workload.model(SIZES)
  params = jax.jit(model.init)(
    jax.random.PRNGKey(seed),
    jnp.zeros((1, SIZES.num_locations, SIZES.feature_dim)),
    jnp.zeros((1, 2), jnp.int32),
  )['params']
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: (
      x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
      if 'bias' in jax.tree_util.keystr(path)
      else x
    ),
    params,
  )
  return model, params


def _inputs(lengths=LENGTHS, seed=0):
  """Non-negative features and captions <start> words <end> <pad>..."""
  rng = np.random.default_rng(seed)
  features = workload.random_features(rng, len(lengths), SIZES)
  tokens = np.zeros((len(lengths), max(lengths)), np.int32)
  for row, n in zip(tokens, lengths):
    row[0], row[n - 1] = 1, 2
    row[1 : n - 1] = rng.integers(4, SIZES.vocab_size, size=n - 2)
  return features, tokens


def _torch(*arrays):
  return [
    torch.from_numpy(a.astype(np.int64) if a.dtype.kind == 'i' else a)
    for a in arrays
  ]


def test_same_parameters_give_capjax_logits_and_loss():
  model, params = _capjax()
  features, tokens = _inputs()
  logits, attention = jax.jit(model.apply)({'params': params}, features, tokens)
  loss, _ = losses.caption_loss(logits, attention, tokens[:, 1:])

  torch_model = torch_tutorial.from_capjax_params(params)
  features_t, tokens_t = _torch(features, tokens)
  with torch.no_grad():
    torch_logits = torch_model(features_t, tokens_t)
    torch_loss = torch_tutorial.caption_loss(torch_logits, tokens_t[:, 1:])
  np.testing.assert_allclose(torch_logits.numpy(), logits, rtol=0, atol=1e-5)
  np.testing.assert_allclose(float(torch_loss), float(loss), rtol=0, atol=1e-5)


@pytest.mark.slow  # compiling capjax's step: 10 to 25 s on 2 busy cores
def test_one_adam_step_matches_capjax_train_step():
  model, params = _capjax()
  features, tokens = _inputs(lengths=(12, 9, 7, 12))
  tx = state_lib.adam(
    workload.LEARNING_RATE,
    b1=workload.ADAM_B1,
    b2=workload.ADAM_B2,
    eps=workload.ADAM_EPS,
    grad_clip_norm=0.0,
  )
  state = state_lib.TrainState(
    step=jnp.array(0, jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.PRNGKey(0)),
  )
  state, _ = jax.jit(
    lambda s, b: step_lib.train_step(
      s, b, model=model, tx=tx, attention_penalty=0.0
    )
  )(state, {'features': features, 'tokens': tokens})

  trainer = torch_tutorial.TorchTrainer(
    compile=False, params=params, device=CPU
  )
  before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
  trainer(*_torch(features, tokens))
  after = trainer.model.state_dict()
  expected = torch_tutorial.from_capjax_params(state.params).state_dict()
  assert max(float((after[k] - before[k]).abs().max()) for k in after) > 5e-4
  for name, value in expected.items():
    # Both step by lr * m_hat / (sqrt(v_hat) + eps), about lr * g / |g| at step
    # 1: where g is tiny, its rounding moves a few elements by up to ~1% of lr
    # (a flipped sign would be 200%).
    np.testing.assert_allclose(
      after[name].numpy(), value.numpy(), rtol=0, atol=1e-5, err_msg=name
    )


def test_sort_by_length_gives_the_padded_loss_and_gradients():
  _, params = _capjax()
  padded, packed = (
    torch_tutorial.TorchTrainer(compile=False, params=params, device=CPU)
    for _ in range(2)
  )
  features_t, tokens_t = _torch(*_inputs())
  padded_loss = padded(features_t, tokens_t)
  packed_loss = packed(features_t, tokens_t, torch.tensor(LENGTHS))
  np.testing.assert_allclose(float(packed_loss), float(padded_loss), rtol=1e-6)
  packed_params = dict(packed.model.named_parameters())
  for name, p in padded.model.named_parameters():
    np.testing.assert_allclose(
      packed_params[name].grad.numpy(),
      p.grad.numpy(),
      rtol=1e-4,
      atol=1e-7,
      err_msg=name,
    )


def test_bfloat16_trains_under_autocast_near_the_float32_loss():
  _, params = _capjax()
  features_t, tokens_t = _torch(*_inputs())
  float32, bfloat16 = (
    torch_tutorial.TorchTrainer(
      compile=False, params=params, dtype=dtype, device=CPU
    )
    for dtype in (torch.float32, torch.bfloat16)
  )
  expected = float(float32(features_t, tokens_t))
  np.testing.assert_allclose(
    float(bfloat16(features_t, tokens_t)), expected, rtol=2e-2
  )


@pytest.mark.slow  # torch.compile: 10 to 30 s on 2 busy cores
def test_compiled_trainer_gives_the_eager_loss():
  _, params = _capjax()
  features_t, tokens_t = _torch(*_inputs())
  lengths_t = torch.tensor(LENGTHS)
  eager, compiled = (
    torch_tutorial.TorchTrainer(compile=c, params=params, device=CPU)
    for c in (False, True)
  )
  for _ in range(2):  # the second step starts from parameters Adam moved
    for args in ((features_t, tokens_t), (features_t, tokens_t, lengths_t)):
      np.testing.assert_allclose(
        float(compiled(*args)), float(eager(*args)), rtol=0, atol=1e-4
      )


# With <end>'s bias raised by 0.3, some of the 8 captions end early and the
# others run to max_len: rows stop at different steps.
@pytest.mark.parametrize('batch,end_bias', [(1, 0.0), (8, 0.3)])
def test_greedy_decoding_gives_capjax_captions(batch, end_bias):
  model, params = _capjax()
  params['fc2']['bias'] = params['fc2']['bias'].at[2].add(end_bias)
  features, _ = _inputs(lengths=(2,) * batch)
  captions = decoding.greedy_captions(
    params, jnp.asarray(features), model=model, max_len=10
  )
  got = torch_tutorial.greedy_captions(
    torch_tutorial.from_capjax_params(params),
    torch.from_numpy(features),
    max_len=10,
  )
  np.testing.assert_array_equal(got.numpy(), captions.tokens_BT)
  if end_bias:
    assert 1 < len(set(np.asarray(captions.lengths_B).tolist()))


def test_greedy_decoding_stops_when_every_caption_has_ended():
  _, params = _capjax()
  torch_model = torch_tutorial.from_capjax_params(params)
  with torch.no_grad():
    torch_model.fc2.bias[2] = 1e3  # <end> wins at once
  features, _ = _inputs(lengths=(2, 2))
  tokens = torch_tutorial.greedy_captions(
    torch_model, torch.from_numpy(features), max_len=5
  )
  np.testing.assert_array_equal(tokens.numpy(), [[2, 0, 0, 0, 0]] * 2)
