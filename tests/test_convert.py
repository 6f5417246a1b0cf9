"""capjax.porting and capjax.convert: tutorial models, as workdirs.

The tutorial's model is trained a few steps with real Keras layers, under
Keras 2 (`tf_keras`, with the OptimizerV2 Adam of TF <= 2.10) and Keras 3,
each in a process of its own (TF_USE_LEGACY_KERAS is read once, at import),
and saved the tutorial's way; `python -m capjax.convert` turns each into a
workdir, and capjax's logits and greedy captions must be the TF model's.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from capjax import files
from capjax import workdir as workdir_lib
from capjax.configs import default
from capjax.data import extractors
from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.porting import tf_checkpoint
from capjax.porting import tutorial_vocab
from capjax.porting import tutorial_weights
from capjax.porting import tutorial_workdir
from capjax.testing import tf_reference as ref
from capjax.training import checkpoints

_TESTS = pathlib.Path(__file__).resolve().parent
_REPO = _TESTS.parent

# Tiny `shapes`-like captions. top_k = 10 keeps ids < 10: 'two', 'squares',
# 'circles' and 'triangle' fall beyond and become <unk>, and 'two' (id 10)
# has an embedding row (vocab_size = top_k + 1) that the model never used.
CAPTIONS = [
  '<start> a red circle <end>',
  '<start> a blue square <end>',
  '<start> two red squares <end>',
  '<start> a green circle <end>',
  '<start> a blue circle <end>',
  '<start> two green circles <end>',
  '<start> a red square <end>',
  '<start> a green triangle <end>',
]
TOP_K = 10
# 2E == U, as in the tutorial (256, 512): the GRU's kernel and recurrent
# kernel have the same shape, so only their names tell them apart.
TUTORIAL_RUN = dict(
  captions=CAPTIONS,
  top_k=TOP_K,
  embedding_dim=16,
  units=32,
  feature_dim=24,
  num_positions=64,
  train_steps=20,
  learning_rate=0.03,
)
KERAS = {
  'keras2': dict(env='1', legacy_optimizer=True),
  'keras3': dict(env='0', legacy_optimizer=False),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """A saved tutorial run and its conversion."""

  directory: pathlib.Path
  workdir: pathlib.Path

  @property
  def checkpoint_dir(self) -> pathlib.Path:
    return self.directory / 'checkpoints' / 'train'

  @property
  def tokenizer(self) -> pathlib.Path:
    return self.directory / 'tokenizer.json'

  def reference(self) -> dict[str, np.ndarray]:
    return dict(np.load(self.directory / 'reference.npz'))

  def word_index(self) -> dict[str, int]:
    return json.loads(
      json.loads(self.tokenizer.read_text())['config']['word_index']
    )


def _env(keras_env: str) -> dict[str, str]:
  env = dict(
    os.environ, TF_USE_LEGACY_KERAS=keras_env, TF_CPP_MIN_LOG_LEVEL='2'
  )
  env['PYTHONPATH'] = os.pathsep.join(
    p for p in (str(_REPO), env.get('PYTHONPATH')) if p
  )
  return env


def _run_all(
  commands: dict[str, tuple[list[str], dict[str, str]]],
) -> dict[str, str]:
  """Runs the commands at once (they mostly import), returns their stdouts."""
  processes = {
    name: subprocess.Popen(
      argv,
      env=env,
      cwd=_REPO,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for name, (argv, env) in commands.items()
  }
  outputs = {name: p.communicate() for name, p in processes.items()}
  for name, p in processes.items():
    assert p.returncode == 0, f'{name}: {" ".join(p.args)}\n{outputs[name][1]}'
  return {name: stdout for name, (stdout, _) in outputs.items()}


def _convert_argv(checkpoint, tokenizer, workdir) -> list[str]:
  return [
    sys.executable,
    '-m',
    'capjax.convert',
    f'--tf_checkpoint={checkpoint}',
    f'--tokenizer={tokenizer}',
    f'--workdir={workdir}',
  ]


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict[str, Run]:
  """Both Keras versions' tutorial runs, each converted by the command line."""
  root = tmp_path_factory.mktemp('tutorial')
  runs = {name: Run(root / name, root / f'{name}_workdir') for name in KERAS}
  save = (
    'import json, sys; from capjax.testing import tf_reference; '
    'tf_reference.save_tutorial_run(sys.argv[1], '
    '**json.loads(sys.argv[2]))'
  )
  commands = {}
  for name, run in runs.items():
    run.directory.mkdir()
    args = dict(TUTORIAL_RUN, legacy_optimizer=KERAS[name]['legacy_optimizer'])
    commands[name] = (
      [sys.executable, '-c', save, str(run.directory), json.dumps(args)],
      _env(KERAS[name]['env']),
    )
  _run_all(commands)
  _run_all(
    {
      name: (
        _convert_argv(run.checkpoint_dir, run.tokenizer, run.workdir),
        _env('0'),
      )
      for name, run in runs.items()
    }
  )
  return runs


def _capjax_ids(run: Run, vocab: vocab_lib.Vocab) -> np.ndarray:
  """The tutorial's id of each capjax id, worked out from the words."""
  return np.array([run.word_index()[w] for w in vocab.words])


@pytest.mark.parametrize('keras', KERAS)
def test_teacher_forced_logits_match_the_tf_model(runs, keras):
  run = runs[keras]
  reference = run.reference()
  config = workdir_lib.load_config(run.workdir)
  vocab = vocab_lib.Vocab.load(run.workdir / workdir_lib.VOCAB_FILE)
  tutorial_ids = _capjax_ids(run, vocab)

  # The tutorial's tokens, renumbered, are what capjax makes of the captions.
  capjax_id = np.full(TOP_K + 1, -1)
  capjax_id[tutorial_ids] = np.arange(vocab.size)
  tokens = capjax_id[reference['tokens']]
  for row, caption in zip(tokens, CAPTIONS):
    words = caption.removeprefix('<start> ').removesuffix(' <end>')
    encoded = vocab.encode(words)
    np.testing.assert_array_equal(row[: len(encoded)], encoded)
    assert not row[len(encoded) :].any()

  model = captioner.from_config(config, vocab.size)
  params = checkpoints.restore_params(run.workdir)[1]
  logits, _ = jax.jit(model.apply)(
    {'params': params}, reference['features'], tokens
  )
  expected = reference['logits'][..., tutorial_ids]
  diff = float(np.max(np.abs(np.asarray(logits) - expected)))
  print(f'{keras}: max |capjax - TF| logit difference {diff:.2e}')
  assert diff <= 1e-4


@pytest.mark.parametrize('keras', KERAS)
def test_workdir_describes_the_tutorial_model(runs, keras):
  run = runs[keras]
  config = workdir_lib.load_config(run.workdir)
  assert (
    config.extractor,
    config.embedding_dim,
    config.units,
    config.top_k,
    config.carry_gru_state,
  ) == ('inception_v3', 16, 32, 6, False)
  assert files.read_json(run.workdir / workdir_lib.FEATURES_FILE) == {
    'extractor': {'name': 'inception_v3', 'weights': 'imagenet'},
    'num_locations': 64,
    'feature_dim': 24,
  }
  vocab = vocab_lib.Vocab.load(run.workdir / workdir_lib.VOCAB_FILE)
  assert vocab.words[4:] == ['a', 'red', 'circle', 'green', 'blue', 'square']
  # The checkpoint's step is the optimizer's iteration count.
  manager = checkpoints.manager(run.workdir, read_only=True)
  assert manager.all_steps() == [TUTORIAL_RUN['train_steps']]
  manager.close()


def test_keras_versions_key_the_checkpoint_differently(runs):
  """What the reader must cope with: Keras 3 keys some variables elsewhere."""
  keys = {
    name: {key for key, _ in tf.train.list_variables(str(run.checkpoint_dir))}
    for name, run in runs.items()
  }
  suffix = '/.ATTRIBUTES/VARIABLE_VALUE'
  assert {
    'decoder/gru/cell/kernel' + suffix,
    'decoder/attention/W1/kernel' + suffix,
    'optimizer/iter' + suffix,
  } <= keys['keras2']
  assert not any(
    k.startswith(('decoder/gru', 'decoder/attention')) for k in keys['keras3']
  )
  assert {
    'decoder/fc1/_kernel' + suffix,
    'optimizer/_trainable_variables/3' + suffix,
    'optimizer/_iterations' + suffix,
  } <= keys['keras3']


@pytest.fixture(scope='module')
def sampled(runs, tmp_path_factory) -> dict[str, tuple[list[str], dict]]:
  """Each run's features as .npy files, and what `capjax.sample` printed."""
  commands, paths = {}, {}
  for name, run in runs.items():
    directory = tmp_path_factory.mktemp(f'{name}_features')
    reference = run.reference()
    paths[name] = [
      str(directory / f'image{i}.npy')
      for i in range(len(reference['features']))
    ]
    for path, features_LD in zip(paths[name], reference['features']):
      np.save(path, features_LD)
    # The tutorial's evaluate() makes at most max_length (= T) words.
    commands[name] = (
      [
        sys.executable,
        '-m',
        'capjax.sample',
        f'--workdir={run.workdir}',
        f'--max_len={reference["tokens"].shape[1]}',
        *paths[name],
      ],
      _env('0'),
    )
  stdouts = _run_all(commands)
  return {
    name: (
      paths[name],
      dict(line.split(': ', 1) for line in stdouts[name].splitlines()),
    )
    for name in runs
  }


@pytest.mark.parametrize('keras', KERAS)
def test_greedy_captions_match_the_tutorials_evaluate(runs, sampled, keras):
  paths, captions = sampled[keras]
  greedy = json.loads((runs[keras].directory / 'greedy.json').read_text())
  expected = [' '.join(w for w in words if w != '<end>') for words in greedy]
  same = sum(captions[p] == e for p, e in zip(paths, expected))
  print(f'{keras}: {same} of {len(paths)} greedy captions identical')
  assert [captions[p] for p in paths] == expected
  assert len(set(expected)) > 2  # the model tells the images apart


def _small_model():
  encoder, decoder = ref.build(
    vocab_size=11,
    embedding_dim=4,
    units=8,
    feature_dim=5,
    num_positions=3,
    carry_gru_state=False,
  )
  ref.perturb_biases(encoder, decoder)
  return encoder, decoder


def test_checkpoint_without_optimizer_reads_at_step_0(tmp_path):
  encoder, decoder = _small_model()
  prefix = tf.train.Checkpoint(encoder=encoder, decoder=decoder).save(
    str(tmp_path / 'ckpt')
  )
  weights, step = tf_checkpoint.read_tutorial_checkpoint(prefix)
  expected = ref.weights(encoder, decoder)
  assert weights.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(weights[name], value, err_msg=name)
  assert step == 0


def test_missing_variables_are_named_without_traceback(runs, tmp_path):
  encoder, _ = _small_model()
  prefix = tf.train.Checkpoint(encoder=encoder).save(str(tmp_path / 'ckpt'))
  workdir = tmp_path / 'workdir'
  result = subprocess.run(
    _convert_argv(prefix, runs['keras3'].tokenizer, workdir),
    env=_env('0'),
    cwd=_REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  for name in (
    'decoder/embedding/embeddings',
    'decoder/gru/kernel',
    'decoder/attention/V/bias',
  ):
    assert name in result.stderr
  assert 'encoder/fc/kernel' not in result.stderr
  assert not workdir.exists()


def _plain_word_index(run: Run, tmp_path: pathlib.Path) -> pathlib.Path:
  """The words the tutorial's model saw, as a plain {word: id} JSON file."""
  path = tmp_path / 'word_index.json'
  path.write_text(
    json.dumps({w: i for w, i in run.word_index().items() if i < TOP_K})
  )
  return path


def test_plain_word_index_gives_the_same_vocabulary(runs, tmp_path):
  run = runs['keras3']
  expected, expected_ids = tutorial_vocab.vocabulary(
    tutorial_vocab.load_tokenizer(run.tokenizer), TOP_K + 1
  )
  vocab, ids = tutorial_vocab.vocabulary(
    tutorial_vocab.load_tokenizer(_plain_word_index(run, tmp_path)), TOP_K + 1
  )
  assert vocab == expected
  np.testing.assert_array_equal(ids, expected_ids)


@pytest.mark.slow
def test_plain_word_index_converts_alike(runs, tmp_path):
  run = runs['keras3']
  workdir = tmp_path / 'workdir'
  tutorial_workdir.convert(
    str(run.checkpoint_dir),
    _plain_word_index(run, tmp_path),
    workdir,
    default.get_config(),
  )
  for name in (
    workdir_lib.VOCAB_FILE,
    workdir_lib.CONFIG_FILE,
    workdir_lib.FEATURES_FILE,
  ):
    assert (workdir / name).read_text() == (run.workdir / name).read_text()
  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    checkpoints.restore_params(workdir)[1],
    checkpoints.restore_params(run.workdir)[1],
  )


def test_refuses_a_workdir_that_holds_a_checkpoint(runs):
  run = runs['keras3']
  with pytest.raises(ValueError, match='already holds a checkpoint'):
    tutorial_workdir.convert(
      str(run.checkpoint_dir), run.tokenizer, run.workdir, default.get_config()
    )


# --- Vocabulary, exactly ------------------------------------------------------

_WORD_INDEX = {
  '<pad>': 0,
  '<unk>': 1,
  '<start>': 2,
  'a': 3,
  '<end>': 4,
  'dog': 5,
  'cat': 6,
  'rare': 7,
}


@pytest.mark.parametrize(
  'num_words, num_rows, words, tutorial_ids',
  [
    # The tutorial: num_words = top_k, one row more.
    (6, 7, ['a', 'dog'], [0, 2, 4, 1, 3, 5]),
    # No num_words: every id with a row.
    (None, 7, ['a', 'dog', 'cat'], [0, 2, 4, 1, 3, 5, 6]),
    (None, 8, ['a', 'dog', 'cat', 'rare'], [0, 2, 4, 1, 3, 5, 6, 7]),
  ],
)
def test_vocabulary_renumbers_the_tutorials_ids(
  num_words, num_rows, words, tutorial_ids
):
  tokenizer = tutorial_vocab.TutorialTokenizer(_WORD_INDEX, num_words)
  vocab, ids = tutorial_vocab.vocabulary(tokenizer, num_rows)
  assert vocab.words == list(vocab_lib.SPECIAL_TOKENS) + words
  np.testing.assert_array_equal(ids, tutorial_ids)


def test_vocabulary_takes_the_oov_token_and_adds_a_missing_pad():
  word_index = {'<oov>': 1, '<start>': 2, '<end>': 3, 'a': 4}
  vocab, ids = tutorial_vocab.vocabulary(
    tutorial_vocab.TutorialTokenizer(word_index, oov_token='<oov>'), 5
  )
  assert vocab.words == list(vocab_lib.SPECIAL_TOKENS) + ['a']
  np.testing.assert_array_equal(ids, [0, 2, 3, 1, 4])


def test_select_tokens_permutes_embedding_rows_and_fc2_columns():
  params = {
    'embedding': {'embedding': np.arange(6)[:, None] * [1, 1]},
    'fc2': {'kernel': np.arange(6)[None] * [[1], [1]], 'bias': np.arange(6)},
    'fc1': {'kernel': np.ones((2, 2)), 'bias': np.ones(2)},
  }
  selected = tutorial_weights.select_tokens(params, np.array([0, 2, 4, 1]))
  np.testing.assert_array_equal(
    selected['embedding']['embedding'][:, 0], [0, 2, 4, 1]
  )
  np.testing.assert_array_equal(selected['fc2']['kernel'][1], [0, 2, 4, 1])
  np.testing.assert_array_equal(selected['fc2']['bias'], [0, 2, 4, 1])
  assert selected['fc1'] is params['fc1']


@pytest.mark.parametrize(
  'word_index, num_words, num_rows, message',
  [
    ({'<unk>': 1, '<start>': 2, 'a': 3}, None, 5, "no '<end>'"),
    (
      {'<unk>': 1, '<start>': 2, 'a': 3, '<end>': 4},
      4,
      5,
      "'<end>' has id 4, which the model never saw",
    ),
    ({'<unk>': 1, '<start>': 2, '<end>': 3, 'a': 3}, None, 5, 'same id 3'),
    (
      {'<pad>': 5, '<unk>': 1, '<start>': 2, '<end>': 3},
      None,
      6,
      "gives '<pad>' the id 5",
    ),
    (
      {'<unk>': 1, '<start>': 2, '<end>': 3, 'a': 4, 'b': 5},
      100,
      5,
      "'b' the id 5, but the checkpoint's embedding has only 5 rows",
    ),
  ],
)
def test_vocabulary_rejects_a_tokenizer_that_does_not_fit(
  word_index, num_words, num_rows, message
):
  with pytest.raises(ValueError, match=message):
    tutorial_vocab.vocabulary(
      tutorial_vocab.TutorialTokenizer(word_index, num_words), num_rows
    )


def test_load_tokenizer_reads_keras_json_and_plain_maps(tmp_path):
  tokenizer = ref.tutorial_tokenizer(CAPTIONS, TOP_K)
  keras_json = tmp_path / 'tokenizer.json'
  keras_json.write_text(tokenizer.to_json())
  assert tutorial_vocab.load_tokenizer(
    keras_json
  ) == tutorial_vocab.TutorialTokenizer(tokenizer.word_index, TOP_K, '<unk>')
  plain = tmp_path / 'plain.json'
  plain.write_text(json.dumps({'<start>': 2, 'a': 3}))
  assert tutorial_vocab.load_tokenizer(
    plain
  ) == tutorial_vocab.TutorialTokenizer({'<start>': 2, 'a': 3})


@pytest.mark.parametrize(
  'text', ['{"a": 1', '["a", "b"]', '{"a": "1"}', '{"a": -1}']
)
def test_load_tokenizer_rejects_other_files(tmp_path, text):
  path = tmp_path / 'tokenizer.json'
  path.write_text(text)
  with pytest.raises(ValueError, match='tokenizer.json'):
    tutorial_vocab.load_tokenizer(path)


@pytest.mark.slow
def test_features_json_is_what_capjax_features_describes(runs, tmp_path):
  """As capjax.sample checks it against the extractor the config makes."""
  config = default.get_config()
  config.extractor_weights = 'none'
  run = runs['keras3']
  tutorial_workdir.convert(
    str(run.checkpoint_dir), run.tokenizer, tmp_path, config
  )
  extractor = extractors.make_extractor(workdir_lib.load_config(tmp_path))
  saved = files.read_json(tmp_path / workdir_lib.FEATURES_FILE)
  # The backend that computes the features does not change them.
  assert saved['extractor'] == {
    k: v for k, v in extractor.info.items() if k != 'backend'
  }
  assert saved['num_locations'] == extractor.num_locations
