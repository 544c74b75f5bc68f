from engine import SamplingParams
from engine.core.outputs import (ENCODER, SCHEDULER_OUTPUT_DECODER, STEP_RESULT_DECODER, ScheduledSeq, SchedulerOutput,
                                 SeqResult, StepResult)


def test_scheduler_output_roundtrip():
    out = SchedulerOutput(step_id=3, seqs=[
        ScheduledSeq(seq_id=1, token_ids=[5, 6], start_pos=4, block_table=[0, 7], sample=True,
                     tree_size=3, candidates=[9, 9, 8], params=SamplingParams(temperature=0.7, top_p=0.9, stop=["x"]),
                     seed=11, num_output_tokens=2)])
    back = SCHEDULER_OUTPUT_DECODER.decode(ENCODER.encode(out))
    assert back == out and back.num_tokens == 5


def test_step_result_roundtrip():
    res = StepResult(step_id=1, results=[SeqResult(seq_id=2, sampled_token_ids=[1, 2], num_accepted=1,
                                                   accepted_per_depth=[1, 0], next_candidates=[3])])
    assert STEP_RESULT_DECODER.decode(ENCODER.encode(res)) == res
