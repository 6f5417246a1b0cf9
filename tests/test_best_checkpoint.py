"""The best checkpoint: chosen by validation, kept over resumes, loaded."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from capjax import captioning
from capjax import config_checks
from capjax import errors
from capjax import inference
from capjax.testing import training as testing_lib
from capjax.training import best as best_lib
from capjax.training import checkpoints
from capjax.training import damage
from capjax.training import loop
from capjax.training import reporting
from capjax.training import validation

# Runs of the training loop share their compiled steps.
pytestmark = pytest.mark.usefixtures('compilation_cache')

_STEPS = 12
# Scripted validation scores by step: the best is step 6, which step 12
# ties (a tie keeps the earlier step), and step 10 is the best after it,
# which a resume that lost the record would choose.
_CIDER = {2: 0.1, 4: 0.2, 6: 0.5, 8: 0.3, 10: 0.4, 12: 0.5, 14: 0.05}
_LOSS = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.2, 10: 2.1, 12: 2.4}


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('shapes')


def _config(shapes_dir, **overrides):
  """Evaluations and checkpoints every 2 steps, all checkpoints kept.

  On the host data path, whose validation loss (loop.evaluate_loss) `_train`
  scripts.
  """
  return testing_lib.tiny_config(
    shapes_dir,
    **{
      'device_data': 'off',
      'num_train_steps': _STEPS,
      'eval_every_steps': 2,
      'checkpoint_every_steps': 2,
      'keep_checkpoints': 10,
      **overrides,
    },
  )


def _eval_steps(config, workdir: pathlib.Path) -> list[int]:
  """The steps a run evaluates at: after the checkpoint it resumes from."""
  start = 0
  if checkpoints.directory(workdir).exists():
    manager = checkpoints.manager(workdir, read_only=True)
    start = manager.latest_step() or 0
    manager.close()
  last = config.num_train_steps
  return [
    s
    for s in range(start + 1, last + 1)
    if s % config.eval_every_steps == 0 or s == last
  ]


def _train(config, workdir: pathlib.Path, *, cider=None, loss=None):
  """Trains, with the evaluations' CIDEr or loss replaced by scripted ones.

  Everything else is real: the loop, its checkpoints and metrics.jsonl.
  """
  steps = iter(_eval_steps(config, workdir))
  original = validation.evaluate_loss

  def scripted_loss(*args):
    scores = original(*args)
    return dict(scores, loss=loss[next(steps)]) if loss else scores

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(validation, 'evaluate_loss', scripted_loss)
    if cider:
      patch.setattr(
        captioning,
        'caption_metrics',
        lambda *_: {'bleu4': 0.0, 'cider': cider[next(steps)]},
      )
    return loop.train_and_evaluate(config, str(workdir))


def _best_of_log(workdir, metric: str, best=max) -> tuple[int, float]:
  """(step, score) of the best evaluation in metrics.jsonl, first on ties."""
  evals = reporting.read_metrics(workdir)['eval']
  top = best(e[metric] for e in evals)
  return next((e['step'], e[metric]) for e in evals if e[metric] == top)


@pytest.fixture(scope='module')
def scripted(tmp_path_factory, shapes_dir):
  """A run whose best CIDEr is at step 6, with checkpoints every even step."""
  workdir = tmp_path_factory.mktemp('scripted') / 'run'
  _train(_config(shapes_dir), workdir, cider=_CIDER)
  return workdir


def test_the_best_step_has_the_best_logged_cider(scripted):
  best = checkpoints.read_best(scripted)
  assert (best.step, best.metric, best.score) == (6, 'cider', 0.5)
  assert _best_of_log(scripted, 'cider') == (6, 0.5)
  # Only the best is kept there; the newest checkpoints are all still kept.
  assert sorted(
    p.name for p in checkpoints.best_directory(scripted).iterdir()
  ) == ['6']
  assert checkpoints.manager(scripted, read_only=True).latest_step() == _STEPS


def test_real_cider_chooses_as_metrics_jsonl_says(tmp_path, shapes_dir):
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(
    _config(
      shapes_dir,
      num_train_steps=8,
      eval_every_steps=4,
      num_caption_eval_images=8,
    ),
    str(workdir),
  )
  best = checkpoints.read_best(workdir)
  assert (best.step, best.score) == _best_of_log(workdir, 'cider')


def test_load_trained_loads_the_best_and_step_overrides(scripted, caplog):
  with caplog.at_level('INFO'):
    trained = inference.load_trained(scripted)
  assert trained.step == 6
  assert 'loading the best checkpoint (step 6, validation CIDEr 0.5)' in (
    caplog.text
  )
  # The best checkpoint holds step 6's parameters, those of checkpoints/6.
  testing_lib.leaves_equal(
    trained.params, checkpoints.restore_params(scripted, step=6)[1]
  )
  caplog.clear()
  with caplog.at_level('INFO'):
    assert inference.load_trained(scripted, step=_STEPS).step == _STEPS
  assert f'loading the checkpoint of step {_STEPS}' in caplog.text
  with pytest.raises(
    errors.MissingFileError,
    match='holds steps 2, 4, 6, 8, 10, 12 and the best, step 6',
  ):
    inference.load_trained(scripted, step=5)


def test_sample_says_which_checkpoint_it_loads(scripted):
  image = next((scripted / 'examples').glob('*.png'))
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.sample',
      f'--workdir={scripted}',
      str(image),
    ],
    capture_output=True,
    text=True,
    check=False,
    cwd=testing_lib.REPO_ROOT,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'loading the best checkpoint (step 6, validation CIDEr 0.5)' in (
    result.stderr
  )


def test_an_exact_resume_keeps_the_best_record(tmp_path, shapes_dir, scripted):
  workdir = tmp_path / 'run'
  _train(_config(shapes_dir, num_train_steps=6), workdir, cider=_CIDER)
  assert checkpoints.read_best(workdir).step == 6
  # A stop after the best checkpoint's save, before the state's: training
  # resumes from step 4 and repeats step 6's evaluation, a tie.
  shutil.rmtree(checkpoints.directory(workdir) / '6')
  _train(_config(shapes_dir, num_train_steps=8), workdir, cider=_CIDER)
  # Resumed from step 8: had the record been lost, step 10 would be chosen.
  _train(_config(shapes_dir), workdir, cider=_CIDER)
  best = checkpoints.read_best(workdir)
  assert (best.step, best.score) == (6, 0.5)
  testing_lib.leaves_equal(
    checkpoints.restore_checkpoint(best),
    checkpoints.restore_checkpoint(checkpoints.read_best(scripted)),
  )


def test_loss_chooses_when_the_caption_evaluation_is_off(
  tmp_path, shapes_dir, caplog
):
  workdir = tmp_path / 'run'
  with caplog.at_level('INFO'):
    _train(_config(shapes_dir, num_caption_eval_images=0), workdir, loss=_LOSS)
  assert 'the validation loss chooses the best checkpoint' in caplog.text
  best = checkpoints.read_best(workdir)
  assert (best.step, best.metric, best.score) == (4, 'loss', 2.0)
  assert _best_of_log(workdir, 'loss', best=min) == (4, 2.0)


def _truncate_arrays(path: pathlib.Path) -> None:
  for data in path.rglob('*'):
    if data.is_file() and data.parent.name == 'd':
      data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def test_a_damaged_best_checkpoint_is_named_and_training_replaces_it(
  scripted, tmp_path, shapes_dir, caplog
):
  workdir = tmp_path / 'run'
  shutil.copytree(scripted, workdir)
  _truncate_arrays(checkpoints.best_directory(workdir))
  with pytest.raises(
    checkpoints.DamagedCheckpointError,
    match=r'the best checkpoint \(step 6\) in .* cannot be '
    rf'read .*pass --step {_STEPS}',
  ) as damaged:
    inference.load_trained(workdir)
  # The file and the reason in words, not TensorStore's spec.
  message = str(damaged.value)
  assert '(a file is cut short: Error reading ' in message
  assert f'local file "{checkpoints.best_directory(workdir)}/6/' in message
  assert '<' not in message and 'tensorstore_spec' not in message
  with caplog.at_level('WARNING'):
    _train(_config(shapes_dir, num_train_steps=14), workdir, cider=_CIDER)
  assert 'the best checkpoint (step 6)' in caplog.text
  assert (workdir / damage.DAMAGED_DIR / 'best_checkpoint' / '6').is_dir()
  # The next evaluation, however poor, is the best since.
  assert checkpoints.read_best(workdir).step == 14


def test_an_unreadable_score_is_named_with_the_newest_step(scripted, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(scripted, workdir)
  (
    checkpoints.best_directory(workdir) / '6' / 'metrics' / 'metrics'
  ).write_text('{"cider": ')
  with pytest.raises(
    checkpoints.DamagedCheckpointError,
    match=r'the best checkpoint in .* cannot be read \(.*\); '
    rf'the newest checkpoint is step {_STEPS}: pass --step',
  ):
    inference.load_trained(workdir)
  assert inference.load_trained(workdir, step=_STEPS).step == _STEPS
  with pytest.raises(checkpoints.DamagedCheckpointError):
    checkpoints.check_best(workdir, expected=None)


def test_without_a_best_checkpoint_the_newest_loads(scripted, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(scripted, workdir)
  shutil.rmtree(checkpoints.best_directory(workdir))
  assert checkpoints.resolve(workdir).kind == 'newest'
  assert inference.load_trained(workdir).step == _STEPS


def test_an_unknown_best_metric_is_refused(shapes_dir):
  with pytest.raises(
    errors.UserError,
    match="config.best_metric must be one of cider, bleu4, loss, got 'bleu'",
  ):
    config_checks.check_config(_config(shapes_dir, best_metric='bleu'))


def test_keeps_within_the_interval_of_the_top():
  top = best_lib.Top(step=6, score=0.5, low=0.35)
  assert best_lib.keeps_within(0.2, None) == (True, True)
  assert best_lib.keeps_within(0.6, top) == (True, True)
  assert best_lib.keeps_within(0.4, top) == (True, False)
  assert best_lib.keeps_within(0.35, top) == (True, False)
  assert best_lib.keeps_within(0.3, top) == (False, False)
  assert best_lib.keeps_within(float('nan'), top) == (False, False)


def test_last_within_keeps_the_newest_step_inside_the_tops_interval(
  tmp_path, shapes_dir
):
  """Step 6 scores highest (0.5, interval from 0.35).

  Step 8 falls below the interval, 10 and 12 lie inside: the rule keeps
  12, where 'best' keeps 6.
  """
  workdir = tmp_path / 'run'
  config = _config(shapes_dir, best_rule='last_within')
  steps = iter(_eval_steps(config, workdir))

  def scripted(*_):
    cider = _CIDER[next(steps)]
    return {'bleu4': 0.0, 'cider': cider, 'cider_low': cider - 0.15}

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(captioning, 'caption_metrics', scripted)
    loop.train_and_evaluate(config, str(workdir))
  best = checkpoints.read_best(workdir)
  assert (best.step, best.score) == (12, 0.5)
  assert sorted(
    p.name for p in checkpoints.best_directory(workdir).iterdir()
  ) == ['12']
  top = json.loads((workdir / best_lib.TOP_FILE).read_text())
  assert top == {'step': 6, 'score': 0.5, 'low': pytest.approx(0.35)}
  # Replayed from the log, the rules choose as training did.
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').open()]
  evaluations = [
    (r['step'], r['cider'], r['cider_low']) for r in rows if 'cider' in r
  ]
  assert best_lib.steps_kept(evaluations) == {'best': 6, 'last_within': 12}


def test_last_within_needs_the_caption_evaluation(shapes_dir):
  with pytest.raises(errors.UserError, match='best_rule'):
    config_checks.check_config(
      _config(shapes_dir, best_rule='last_within', best_metric='loss')
    )


def test_the_console_shows_each_interval_after_its_score():
  scores = {'loss': 2.0, 'cider': 0.5, 'cider_low': 0.35, 'cider_high': 0.6}
  assert reporting.format_scores(scores) == (
    'loss 2.0000 | cider 0.5000 [0.3500, 0.6000]'
  )
