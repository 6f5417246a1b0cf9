"""capjax against the PyTorch baseline (capjax.benchmarks.torch_tutorial).

Training captions/s at the fixed lengths of capjax.benchmarks.training and
on the real lengths of the Flickr8k training captions, and greedy decoding
at batch 64 and batch 1. Each PyTorch figure comes eager and compiled
(`torch.compile`), timed interleaved with capjax's in one
`harness.interleaved_medians`. Where compilation fails, the compiled figures
are None and `torch_compiled_error` says why.

On the real lengths, capjax runs its default batching (random batches, each
padded to the smallest bucket that fits) and its length-grouped batches
(`group_by_length`, the counterpart of sorting by length), each rated as
capjax.benchmarks.training rates it: its bucket step times, each timed here,
weighted by the buckets' frequencies. PyTorch runs random batches of 64 real
lengths the way sgrvinod's tutorial does, sorted and shrinking as captions
end; its figure is the mean step time over `flickr8k_batches` of them.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from capjax.benchmarks import harness
from capjax.benchmarks import torch_tutorial
from capjax.benchmarks import training
from capjax.benchmarks import workload
from capjax.configs import default
from capjax.model import decoding

_TRAINERS = ('torch_eager', 'torch_compiled')


def random_captions(
  rng: np.random.Generator, lengths_B: np.ndarray
) -> np.ndarray:
  """<start>, random words, <end> and padding: (B, max length) int64."""
  tokens_BT = np.zeros((len(lengths_B), lengths_B.max()), np.int64)
  for row_T, n in zip(tokens_BT, lengths_B):
    row_T[0], row_T[n - 1] = torch_tutorial.START, torch_tutorial.END
    row_T[1 : n - 1] = rng.integers(
      torch_tutorial.END + 1, workload.VOCAB_SIZE, size=n - 2
    )
  return tokens_BT


class _TorchTimer:
  """PyTorch trainers, eager and compiled, as timed fns; compilation tried
  once, its failure kept as the reason the compiled figures are missing."""

  def __init__(self, features_BLD: np.ndarray):
    self.device = torch_tutorial.default_device()
    self._trainers = {
      name: torch_tutorial.TorchTrainer(
        compile=name == 'torch_compiled', device=self.device
      )
      for name in _TRAINERS
    }
    self._features = torch.from_numpy(features_BLD).to(self.device)
    self.compile_error: str | None = None

  def fns(
    self, batches: Sequence[tuple[torch.Tensor, ...]]
  ) -> dict[str, Callable[[], Any]]:
    """Each trainer stepping on every batch, ready to time."""
    fns = {}
    for name, trainer in self._trainers.items():
      fn = torch_tutorial.synchronized(
        functools.partial(_steps, trainer, self._features, batches), self.device
      )
      if name == 'torch_compiled':
        if self.compile_error is not None:
          continue
        try:
          fn()  # compiles
        # Whatever stops torch.compile on this host drops its figures, not
        # the benchmark, and the reason is reported.
        except Exception as e:  # noqa: BLE001
          self.compile_error = f'{type(e).__name__}: {str(e).strip()[:500]}'
          continue
      fns[name] = fn
    return fns


def _steps(
  trainer: torch_tutorial.TorchTrainer,
  features_BLD: torch.Tensor,
  batches: Sequence[tuple[torch.Tensor, ...]],
) -> None:
  for batch in batches:
    trainer(features_BLD, *batch)


def _rates(step_s: dict[str, float]) -> dict[str, float | None]:
  """Captions/s and step seconds; None for a trainer that did not run."""
  return {
    **{f'{k}_step_s': s for k, s in step_s.items()},
    **{
      f'{k}_captions_per_s': workload.BATCH_SIZE / step_s[k]
      if k in step_s
      else None
      for k in ('capjax', *_TRAINERS)
    },
  }


def bench_torch_training(
  repeats: int, lengths: Sequence[int], flickr8k_batches: int
) -> dict[str, Any]:
  """Training captions/s of capjax and PyTorch, eager and compiled."""
  rng = np.random.default_rng(0)
  features = workload.random_features(rng, workload.BATCH_SIZE)
  capjax_trainer = workload.CapjaxTrainer()
  torch_timer = _TorchTimer(features)
  to_torch = lambda a: torch.from_numpy(a).long().to(torch_timer.device)

  def capjax_fn(length):
    batch = workload.batch(features, workload.random_tokens(rng, length))
    return lambda: capjax_trainer(batch)

  results: dict[str, Any] = {'fixed_length': {}}
  for t in lengths:
    tokens_BT = workload.random_tokens(rng, t)
    step_s = harness.interleaved_medians(
      {'capjax': capjax_fn(t), **torch_timer.fns([(to_torch(tokens_BT),)])},
      repeats,
    )
    results['fixed_length'][t] = _rates(step_s)
  flickr8k = training.flickr8k_train_captions()
  if flickr8k is not None:
    caption_lengths, image_index = flickr8k
    config = default.get_config()
    grouped_config = config.copy_and_resolve_references()
    grouped_config.group_by_length = True
    buckets, grouped_buckets = (
      training.bucket_frequencies(caption_lengths, image_index, c)
      for c in (config, grouped_config)
    )
    lengths_NB = [
      rng.choice(caption_lengths, workload.BATCH_SIZE, replace=False).astype(
        np.int64
      )
      for _ in range(flickr8k_batches)
    ]
    torch_batches = [
      (to_torch(random_captions(rng, n_B)), to_torch(n_B)) for n_B in lengths_NB
    ]
    seconds = harness.interleaved_medians(
      {
        **{t: capjax_fn(t) for t in {**buckets, **grouped_buckets}},
        **torch_timer.fns(torch_batches),
      },
      repeats,
    )
    step_s = {
      k: seconds[k] / flickr8k_batches for k in _TRAINERS if k in seconds
    }
    step_s['capjax'] = sum(f * seconds[t] for t, f in buckets.items())
    grouped_s = sum(f * seconds[t] for t, f in grouped_buckets.items())
    results['flickr8k_lengths'] = {
      **_rates(step_s),
      'capjax_grouped_captions_per_s': workload.BATCH_SIZE / grouped_s,
      'capjax_bucket_frequencies': buckets,
      'capjax_grouped_bucket_frequencies': grouped_buckets,
      'torch_batches': flickr8k_batches,
      'torch_mean_longest': float(np.mean([n.max() for n in lengths_NB])),
      'mean_length': float(caption_lengths.mean()),
    }
  results['torch_compiled_error'] = torch_timer.compile_error
  return results


def bench_torch_decoding(repeats: int, max_len: int) -> dict[str, Any]:
  """Greedy captions/s at batch 64 and latency at batch 1.

  Both decode with the same random parameters, which never produce <end>,
  so every caption runs max_len tokens; `identical_captions` is the share of
  the 64 captions on which capjax and PyTorch agree (float rounding can flip
  a near tie).
  """
  model = workload.model()
  features = workload.random_features(
    np.random.default_rng(1), workload.BATCH_SIZE
  )
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0), features[:1], jnp.zeros((1, 2), jnp.int32)
  )['params']
  greedy = functools.partial(
    decoding.greedy_captions, params, model=model, max_len=max_len
  )
  batch, single = jnp.asarray(features), jnp.asarray(features[:1])
  fns = {
    'capjax_batch': lambda: greedy(batch).tokens_BT,
    'capjax_single': lambda: greedy(single).tokens_BT,
  }
  device = torch_tutorial.default_device()
  features_torch = torch.from_numpy(features).to(device)
  torch_tokens, compile_error = {}, None
  for name in _TRAINERS:
    torch_model = torch_tutorial.from_capjax_params(params).to(device).eval()
    # .cpu() waits for the device, as the loop's stopping test does.
    decode = lambda f, m=torch_model: torch_tutorial.greedy_captions(
      m, f, max_len
    ).cpu()
    if name == 'torch_compiled':
      torch_tutorial.compile_cell(torch_model)
      try:
        decode(features_torch)
        decode(features_torch[:1])
      except Exception as e:  # noqa: BLE001
        compile_error = f'{type(e).__name__}: {str(e).strip()[:500]}'
        continue
    fns[f'{name}_batch'] = functools.partial(decode, features_torch)
    fns[f'{name}_single'] = functools.partial(decode, features_torch[:1])
    torch_tokens[name] = decode(features_torch).numpy()
  seconds = harness.interleaved_medians(fns, repeats)
  capjax_tokens = np.asarray(greedy(batch).tokens_BT)
  results: dict[str, Any] = {
    'max_len': max_len,
    'torch_compiled_error': compile_error,
    'torch_version': torch.__version__,
    'torch_device': str(device),
  }
  for name in ('capjax', *_TRAINERS):
    if f'{name}_batch' in seconds:
      results[f'{name}_captions_per_s'] = (
        workload.BATCH_SIZE / seconds[f'{name}_batch']
      )
      results[f'{name}_latency_ms'] = 1e3 * seconds[f'{name}_single']
  for name, tokens_BT in torch_tokens.items():
    results[f'{name}_identical_captions'] = float(
      np.all(tokens_BT == capjax_tokens, axis=1).mean()
    )
  return results


def bench_torch(repeats: int, max_len: int, quick: bool) -> dict[str, Any]:
  """The PyTorch rows: training (one length and two Flickr8k batches if
  quick) and decoding."""
  lengths = training.LENGTHS[:1] if quick else training.LENGTHS
  return {
    'training': bench_torch_training(
      repeats, lengths, flickr8k_batches=2 if quick else 8
    ),
    'decoding': bench_torch_decoding(repeats, max_len),
  }
