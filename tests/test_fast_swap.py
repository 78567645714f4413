"""fast/swap.py: modules swapped in for a run, the very same objects put back, never a traceback."""

import torch
from torch import nn

from minipeft.fast.swap import Swap, swapped_in


def test_the_same_objects_are_back_and_a_new_shared_parameter_is_kept():
    parent = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    linear, dropout = parent[0], parent[1]
    stand_in = nn.Linear(3, 3)
    stand_in.weight = linear.weight  # the same Parameter, as a stand-in holds it
    with swapped_in([Swap(parent, {"0": stand_in, "1": nn.Identity()}, shared=("weight",))]) as swapped:
        assert swapped == 1 and parent[0] is stand_in and isinstance(parent[1], nn.Identity)
        stand_in.weight = nn.Parameter(torch.ones(3, 3))  # a resumed run loads a new Parameter
    assert parent[0] is linear and parent[1] is dropout
    assert linear.weight is stand_in.weight


def test_a_child_replaced_during_the_run_is_left_and_said():
    parent = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    original_dropout = parent[1]
    heard, stranger = [], nn.Tanh()
    with swapped_in([Swap(parent, {"0": nn.Identity(), "1": nn.Identity()})], heard.append):
        parent[1] = stranger
    assert parent[1] is stranger and isinstance(parent[0], nn.Identity)  # the swap is undone as one, or not at all
    assert parent[1] is not original_dropout
    assert len(heard) == 1 and "Sequential.1 was replaced during the run; left as it is" in heard[0]


def test_a_failure_to_put_back_is_a_warning():
    parent = nn.Sequential(nn.Linear(3, 3))
    stand_in = nn.Linear(3, 3)
    heard = []
    with swapped_in([Swap(parent, {"0": stand_in}, shared=("weight",))], heard.append, what="the linear",
                    if_left="it computes the same"):
        del stand_in.weight
    assert parent[0] is stand_in
    assert heard == ["warning: could not put the linear back in a Sequential ('Linear' object has no attribute "
                     "'weight'); it computes the same"]
