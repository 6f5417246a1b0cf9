"""The benchmark report as a markdown table."""

from capjax.benchmarks import flops
from capjax.benchmarks import training

_TORCH = ('capjax', 'torch_eager', 'torch_compiled')
_EFFICIENCY_TARGET = 0.65
_TIME_TO_QUALITY_TARGET = 5


def _row(name, capjax, baseline, ratio, target):
  met = '' if target is None else ('yes' if ratio >= target else 'NO')
  return [
    name,
    capjax,
    baseline,
    f'{ratio:.1f}x',
    '' if target is None else f'>= {target:g}x',
    met,
  ]


def table_rows(report: dict) -> list[list[str]]:
  """[benchmark, capjax, baseline, ratio, target, met] rows of the table."""
  rows = []
  for t, r in report['training']['fixed_length'].items():
    rows.append(
      _row(
        f'training, T={t} (captions/s)',
        f'{r["capjax_captions_per_s"]:.1f}',
        f'{r["tutorial_captions_per_s"]:.1f}',
        r['capjax_captions_per_s'] / r['tutorial_captions_per_s'],
        2.2,
      )
    )
  for name, batching in (
    ('flickr8k_lengths', 'random batches'),
    ('flickr8k_lengths_grouped', 'group_by_length'),
  ):
    real = report['training'].get(name)
    if not real:
      continue
    buckets = ', '.join(
      f'{t}: {f:.0%}' for t, f in real['capjax_bucket_frequencies'].items()
    )
    rows.append(
      _row(
        f'training, Flickr8k lengths, {batching} (captions/s; capjax '
        f'buckets {buckets}; tutorial T={real["tutorial_length"]})',
        f'{real["capjax_captions_per_s"]:.1f}',
        f'{real["tutorial_captions_per_s"]:.1f}',
        real['capjax_captions_per_s'] / real['tutorial_captions_per_s'],
        5,
      )
    )
  d = report['decoding']
  rows.append(
    _row(
      f'greedy decoding, batch 64, {d["max_len"]} tokens (captions/s)',
      f'{d["capjax_captions_per_s"]:.1f}',
      f'{d["tutorial_captions_per_s"]:.2f}',
      d['capjax_captions_per_s'] / d['tutorial_captions_per_s'],
      100,
    )
  )
  rows.append(
    _row(
      'greedy decoding, batch 1 (latency ms, lower is better)',
      f'{d["capjax_latency_ms"]:.1f}',
      f'{d["tutorial_latency_ms"]:.0f}',
      d['tutorial_latency_ms'] / d['capjax_latency_ms'],
      20,
    )
  )
  rows.append(
    _row(
      'greedy decoding, batch 1, vs the per-token loop around '
      "capjax's jitted step (latency ms)",
      f'{d["capjax_latency_ms"]:.1f}',
      f'{d["step_loop_latency_ms"]:.0f}',
      d['step_loop_latency_ms'] / d['capjax_latency_ms'],
      None,
    )
  )
  e = report.get('export')
  for name, label in (
    ('shapes', 'shapes model from pixels'),
    ('tutorial', 'tutorial-size decoder from features'),
  ):
    if not e:
      break
    r = e[name]
    rows.append(
      _row(
        f'exported graph, {label}: capjax vs ONNX Runtime, greedy batch 1 '
        '(latency ms, lower is better)',
        f'{r["capjax_latency_ms"]:.1f}',
        f'{r["onnx_latency_ms"]:.1f}',
        r['onnx_latency_ms'] / r['capjax_latency_ms'],
        None,
      )
    )
    rows.append(
      _row(
        f'exported graph, {label}: capjax vs ONNX Runtime, greedy batch '
        f'{e["batch_size"]} (captions/s)',
        f'{r["capjax_captions_per_s"]:.1f}',
        f'{r["onnx_captions_per_s"]:.1f}',
        r['capjax_captions_per_s'] / r['onnx_captions_per_s'],
        None,
      )
    )
  p = report['pipeline_examples_per_s']
  for cache in (False, True):
    rows.append(
      _row(
        f'input pipeline, cache_features={cache} (examples/s)',
        f'{p[f"capjax_cache_{cache}"]:.0f}',
        f'{p["tutorial_npy_per_image"]:.0f}',
        p[f'capjax_cache_{cache}'] / p['tutorial_npy_per_image'],
        5,
      )
    )
  c = report.get('cider')
  if c:
    rows.append(
      _row(
        f"CIDEr-D of {c['candidates']} candidates, capjax's JAX scorer vs "
        'pycocoevalcap (ms, lower is better)',
        f'{1e3 * c["capjax_s"]:.1f}',
        f'{1e3 * c["pycocoevalcap_s"]:.0f}',
        c['pycocoevalcap_s'] / c['capjax_s'],
        20,
      )
    )
  s = report.get('scst')
  if s:
    rows.append(
      _row(
        f'SCST step, {s["captions"]} sampled captions of {s["max_len"]} '
        f'tokens, vs a cross-entropy step on as many (ms; reward '
        f'{s["reward_share"]:.0%} of the step)',
        f'{1e3 * s["scst_greedy_s"]:.0f}',
        f'{1e3 * s["xent_s"]:.0f}',
        # At most 1.5x the cross-entropy step's time.
        s['xent_s'] / s['scst_greedy_s'],
        0.67,
      )
    )
  q = report.get('time_to_quality')
  if q:
    rows += time_to_quality_rows(q)
  e = report['efficiency']
  rows.append(
    [
      f'train step efficiency, T={e["length"]} (model GFLOP/s '
      'vs measured float32 matmul peak)',
      f'{e["achieved_flops"] / 1e9:.1f}',
      f'{e["peak_flops"] / 1e9:.1f}',
      f'{e["achieved_flops"] / e["peak_flops"]:.0%}',
      f'>= {_EFFICIENCY_TARGET:.0%}',
      'yes'
      if (e['achieved_flops'] >= _EFFICIENCY_TARGET * e['peak_flops'])
      else 'NO',
    ]
  )
  rows.append(
    [
      f'tutorial train step efficiency, T={e["length"]} (its model '
      'GFLOP/s, W1 applied at every step, vs the same peak)',
      '',
      f'{e["tutorial_achieved_flops"] / 1e9:.1f}',
      f'{e["tutorial_achieved_flops"] / e["peak_flops"]:.0%}',
      '',
      '',
    ]
  )
  return rows


def _variant(overrides: dict) -> str:
  if not overrides:
    return "the tutorial's model and batches"
  return ', '.join(f'{k}={v}' for k, v in overrides.items())


def time_to_quality_rows(q: dict) -> list[list[str]]:
  """Training seconds to a validation loss (benchmarks.time_to_quality)."""
  tutorial_s = q['tutorial']['seconds_to_target']
  figure = lambda s: (
    f'{s:.0f}' if s is not None else f'not reached in {q["max_seconds"]:.0f}'
  )
  rows = []
  for name, overrides in q['variants'].items():
    capjax_s = q[name]['seconds_to_target']
    if capjax_s is None:
      ratio, met = '', 'NO'
    elif tutorial_s is None:
      bound = q['max_seconds'] / capjax_s
      ratio = f'> {bound:.1f}x'
      met = 'yes' if bound >= _TIME_TO_QUALITY_TARGET else ''
    else:
      ratio = f'{tutorial_s / capjax_s:.1f}x'
      met = 'yes' if tutorial_s / capjax_s >= _TIME_TO_QUALITY_TARGET else 'NO'
    rows.append(
      [
        f'time to validation loss {q["target_loss"]:g} ({q["train_captions"]} '
        f'real Flickr8k captions, batch {q["batch_size"]}; capjax: '
        f'{_variant(overrides)}) (training s, lower is better)',
        figure(capjax_s),
        figure(tutorial_s),
        ratio,
        f'>= {_TIME_TO_QUALITY_TARGET:g}x',
        met,
      ]
    )
  return rows


def time_to_quality_lines(q: dict) -> list[str]:
  """The validation curves of the time-to-quality row."""
  lines = [
    '',
    f'Time to quality: validation loss on {q["val_captions"]} '
    f'captions every {q["eval_every"]} steps (training seconds: '
    'loss); the tutorial pads every caption to '
    f'T={q["tutorial_length"]}, features {q["feature_shape"][0]}x'
    f'{q["feature_shape"][1]}, V={q["vocab_size"]}.',
  ]
  for name in ['tutorial', *q['variants']]:
    c = q[name]['curve']
    lines.append(
      f'- {name}: '
      + ', '.join(
        f'{s:.0f}: {l:.3f}' for s, l in zip(c['seconds'], c['val_loss'])
      )
    )
  return lines


def time_to_quality_markdown(report: dict) -> str:
  """The time-to-quality row alone (benchmark.py --time_to_quality_only)."""
  lines = [
    '| benchmark | capjax | tutorial (TF) | ratio | target | met |',
    '|---|---|---|---|---|---|',
  ]
  lines += [
    '| ' + ' | '.join(row) + ' |'
    for row in time_to_quality_rows(report['time_to_quality'])
  ]
  lines += time_to_quality_lines(report['time_to_quality'])
  s = report['settings']
  lines += [
    '',
    f'capjax on {s["jax_device"]} (JAX {s["jax"]}); the tutorial '
    f'on the CPU (TensorFlow {s["tensorflow"]}); {s["cpus"]} CPU '
    f'cores ({s["processor"]}).',
  ]
  return '\n'.join(lines) + '\n'


def _figure(rates: dict, key: str) -> str:
  value = rates.get(key)
  return '' if value is None else f'{value:.1f}'


def _ratio(rates: dict, key: str) -> str:
  value = rates.get(key)
  return '' if value is None else f'{rates["capjax"] / value:.1f}x'


def torch_lines(torch_report: dict) -> list[str]:
  """The PyTorch baseline's table (capjax.benchmarks.torch_baseline)."""
  t, d = torch_report['training'], torch_report['decoding']
  named = [
    (f'training, T={length} (captions/s)', r)
    for length, r in t['fixed_length'].items()
  ]
  if 'flickr8k_lengths' in t:
    real = t['flickr8k_lengths']
    named.append(
      (
        'training, Flickr8k lengths (captions/s; capjax random '
        'batches in buckets, PyTorch sorted and shrinking)',
        real,
      )
    )
    if 'capjax_grouped_captions_per_s' in real:
      grouped = real['capjax_grouped_captions_per_s']
      named.append(
        (
          'the same, capjax with group_by_length',
          {**real, 'capjax_captions_per_s': grouped},
        )
      )
  rows = [
    [name] + [r.get(f'{k}_captions_per_s') for k in _TORCH] for name, r in named
  ]
  rows.append(
    [f'greedy decoding, batch 64, {d["max_len"]} tokens (captions/s)']
    + [d.get(f'{k}_captions_per_s') for k in _TORCH]
  )
  # Latency as its inverse, so that every ratio reads "capjax is Nx faster".
  rows.append(
    ['greedy decoding, batch 1 (captions/s = 1000 / latency ms)']
    + [
      1e3 / d[f'{k}_latency_ms'] if f'{k}_latency_ms' in d else None
      for k in _TORCH
    ]
  )
  lines = [
    '',
    '| vs PyTorch | capjax | PyTorch eager | PyTorch compiled '
    '| capjax / eager | capjax / compiled |',
    '|---|---|---|---|---|---|',
  ]
  for name, *values in rows:
    rates = dict(zip(_TORCH, values))
    lines.append(
      '| '
      + ' | '.join(
        [
          name,
          _figure(rates, 'capjax'),
          _figure(rates, 'torch_eager'),
          _figure(rates, 'torch_compiled'),
          _ratio(rates, 'torch_eager'),
          _ratio(rates, 'torch_compiled'),
        ]
      )
      + ' |'
    )
  for part in (t, d):
    if part['torch_compiled_error']:
      lines.append(f'\ntorch.compile failed: {part["torch_compiled_error"]}')
  lines.append(f'\nPyTorch {d["torch_version"]} on {d["torch_device"]}.')
  return lines


def markdown(report: dict) -> str:
  """The table, with the settings it was measured with."""
  s = report['settings']
  lines = [
    '| benchmark | capjax | tutorial (TF) | ratio | target | met |',
    '|---|---|---|---|---|---|',
  ]
  lines += ['| ' + ' | '.join(row) + ' |' for row in table_rows(report)]
  if 'torch' in report:
    lines += torch_lines(report['torch'])
  if 'time_to_quality' in report:
    lines += time_to_quality_lines(report['time_to_quality'])
  extraction = report.get('extraction_images_per_s')
  if extraction:
    lines.append('')
    lines.append(
      'Feature extraction (images/s): '
      + ', '.join(f'{k} {v:.1f}' for k, v in extraction.items())
      + '.'
    )
  lines += [
    '',
    f'capjax on {s["jax_device"]} (JAX {s["jax"]}); the tutorial on the '
    f'CPU (TensorFlow {s["tensorflow"]}); {s["cpus"]} CPU cores '
    f'({s["processor"]}). Medians of {s["repeats"]} interleaved runs; '
    'V=5001, E=256, U=512, L=64, D=2048, batch 64. Model FLOPs count the '
    'matmuls only, x3 for forward and backward (x2 for the encoder). '
    'The tutorial does more FLOPs per step than capjax by '
    + ', '.join(
      f'{flops.tutorial_train_flops(t) / flops.train_flops(t):.2f}x at T={t}'
      for t in training.LENGTHS
    )
    + ': the training speed-up if both ran at the same FLOP/s.',
  ]
  return '\n'.join(lines) + '\n'
