"""Where the real COCO/Flickr8k test data lives, if anywhere.

Shared by the test fixtures and the benchmarks.
"""

import json
import os
import pathlib

ENV = 'CAPJAX_TEST_DATA'


def find() -> pathlib.Path | None:
  """The real test images and captions: $CAPJAX_TEST_DATA or ../shared/data."""
  candidates = []
  if os.environ.get(ENV):
    candidates.append(pathlib.Path(os.environ[ENV]))
  repo_root = pathlib.Path(__file__).resolve().parents[2]
  candidates.append(repo_root.parent / 'shared' / 'data')
  for path in candidates:
    if (path / 'coco-mini').is_dir():
      return path
  return None


def coco_val_split(directory: pathlib.Path, data: pathlib.Path, n: int) -> str:
  """A `coco_json` split of the first n COCO val2017 images of `data`.

  Writes its annotation file into `directory`; returns the split's name
  for config.train_split and the like.
  """
  val = json.loads(
    (data / 'coco-mini' / 'annotations' / 'captions_val2017.json').read_text()
  )
  images = val['images'][:n]
  ids = {i['id'] for i in images}
  kept = [a for a in val['annotations'] if a['image_id'] in ids]
  (directory / f'first{n}.json').write_text(
    json.dumps({'images': images, 'annotations': kept})
  )
  return f'first{n}.json:{data}/coco-mini/val2017'
