"""The pre-training data stream's position in a checkpoint (``StreamPosition.saved``: every reader's state), one
file of the checkpoint folder written by rank 0. Not in DeepSpeed's client state, which ZeRO-3 writes into every
rank's model-states file: at 1,024 ranks that was 1,024 copies of a position that grows with the ranks."""
import json
from pathlib import Path

from eve_ds.checkpoint.pretrained import write_atomically

DATA_POSITION = "data_position.json"


def write_data_position(folder, saved: dict):
    """Rank 0's part of a save."""
    write_atomically(Path(folder) / DATA_POSITION, lambda path: path.write_text(json.dumps(saved)))


def read_data_position(folder, client_state: dict):
    """The data position of the checkpoint in ``folder``: its DATA_POSITION file, or the client state's "data" where
    the checkpoint was written before that file existed; None where it has neither."""
    path = Path(folder) / DATA_POSITION
    if path.is_file():
        return json.loads(path.read_text())
    return client_state.get("data")
