"""Structured outputs: constraints validated, outputs valid under them, greedy Medusa == greedy
plain under every constraint kind (trees pruned to the grammar or not, random heads whose
every candidate the grammar refuses, preemption), grammar state freed with its request, and
the HTTP API (response_format, structured_outputs, guided_*; 400s naming the field)."""

import json
import re

import httpx
import jsonschema
import pytest

from engine import Engine, SamplingParams
from engine.async_engine import AsyncEngine
from engine.core.sampling_params import StructuredOutputs
from engine.core.structured import _allowed

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}}
NESTED = {"type": "object", "additionalProperties": False, "required": ["topic", "details"],
          "properties": {"topic": {"type": "string", "maxLength": 40},
                         "details": {"type": "object", "additionalProperties": False,
                                     "required": ["difficulty", "tags"],
                                     "properties": {"difficulty": {"enum": ["easy", "medium", "hard"]},
                                                    "tags": {"type": "array", "items": {"type": "string",
                                                                                        "maxLength": 20},
                                                             "maxItems": 3}}}}}
GRAMMAR = 'root ::= "The answer is " ("A" | "B" | "C") "."'
REGEX = r"(yes|no), because [a-z ]{1,40}\."
CHOICE = ["positive", "negative", "neutral"]
CONSTRAINTS = [{"json": PERSON}, {"json": NESTED}, {"json_object": True}, {"regex": REGEX}, {"choice": CHOICE},
               {"grammar": GRAMMAR}]
PROMPTS = ["Give me a JSON record of a person named Alice who is 30 and lives in Paris.",
           "Describe a topic you like, with its difficulty and a few tags.",
           "Is the sky green? Answer yes or no and say why.",
           "What do you think of rainy days?"]


def check_output(constraint: dict, text: str) -> None:
    """The text satisfies the constraint (a finished output: finish_reason 'stop')."""
    kind, spec = next(iter(constraint.items()))
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    elif kind == "choice":
        assert text in spec
    else:
        assert re.fullmatch(r"The answer is [ABC]\.", text), text


@pytest.fixture(scope="module")
def engines(bundled_dir):
    kw = dict(kv_cache_memory_gb=0.25, max_num_seqs=8)
    out = {"plain": Engine("default", **kw),
           "medusa": Engine("default", speculative={"tree": "mc_sim_7b_63", "acceptance": "greedy"}, **kw),
           "unpruned": Engine("default", speculative={"tree": [[0], [1], [0, 0], [1, 0], [0, 0, 0]],
                                                             "grammar_pruning": False}, **kw),
           # Random heads: candidates the grammar refuses nearly everywhere; the bonus token
           # (drawn from the masked root row) carries every step.
           "random": Engine("default", speculative={"heads": "random", "tree": [[0], [1], [2], [0, 0], [0, 1]],
                                                    "grammar_pruning": False}, **kw)}
    yield out
    for e in out.values():
        e.shutdown()


def test_constraints_are_validated():
    for bad, field in [({}, "structured_outputs"), ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
                       ({"json": "{not json"}, "structured_outputs.json"), ({"choice": []}, "structured_outputs.choice"),
                       ({"regex": ""}, "structured_outputs.regex"), ({"made_up": 1}, "structured_outputs")]:
        with pytest.raises(ValueError, match=re.escape(field)):
            SamplingParams(structured_outputs=bad)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs={"json_object": True})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, max_tokens=4, structured_outputs={"json_object": True})
    deep = {"type": "string"}
    for _ in range(500):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match="deeper"):
        StructuredOutputs(json=deep)
    assert StructuredOutputs(json=json.dumps(PERSON)).key() == StructuredOutputs(json=PERSON).key()


def test_bad_grammars_are_refused_naming_the_field(engines):
    eng = engines["plain"]
    for spec, field in [({"regex": "(unclosed"}, "structured_outputs.regex"),
                        ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
                        ({"json": {"type": "no-such-type"}}, "structured_outputs.json")]:
        with pytest.raises(ValueError, match=re.escape(field)):
            eng.add_request("Hi", SamplingParams(max_tokens=4, structured_outputs=spec))
    assert not eng.has_unfinished() and len(eng.structured) == 0


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: next(iter(c)))
def test_greedy_medusa_equals_plain_and_outputs_are_valid(engines, constraint):
    params = SamplingParams(temperature=0, max_tokens=48, structured_outputs=constraint)
    ref = engines["plain"].generate_batch(PROMPTS, params, chat=True)
    finished = [o for o in ref if o.finish_reason == "stop"]
    assert len(finished) >= 2  # the grammar ends most answers well within the budget
    for o in finished:
        check_output(constraint, o.text)
    for name in ("medusa", "unpruned", "random"):
        eng = engines[name]
        for batch in (PROMPTS, PROMPTS[:1]) if name == "medusa" else (PROMPTS,):
            got = eng.generate_batch(batch, params, chat=True)
            assert [o.token_ids for o in got] == [o.token_ids for o in ref[:len(batch)]], (name, constraint)
        assert len(eng.structured) == 0  # every request's matcher dropped when it finished


def test_pruning_fits_trees_to_the_grammar(engines):
    """Nodes the grammar refuses get the tokens a near-forced parent state allows: the pruned
    engine verifies more allowed candidates and accepts more tokens per step than one that
    verifies the heads' tokens as they are (the output is the same, above)."""
    params = SamplingParams(temperature=0, max_tokens=64, structured_outputs={"json": NESTED})
    per_step = {}
    for name in ("medusa", "unpruned"):
        eng = engines[name]
        so = eng.structured
        so.nodes = so.refused = so.replaced = 0
        eng.reset_stats()
        eng.generate_batch(PROMPTS, params, chat=True)
        per_step[name] = eng.stats.mean_accepted_length
        assert so.nodes > 0 and so.refused > 0
        assert (so.replaced > 0) == (name == "medusa")
    assert per_step["medusa"] > 1.5


def test_every_row_is_masked_by_its_paths_grammar_state(engines):
    """The masks the driver builds: row i allows exactly what the grammar allows after the
    candidates on node i's path; a node whose token its parent refuses leaves its row unmasked
    (no decision can reach it)."""
    eng = engines["unpruned"]
    so = eng.structured
    ids = eng.encode('{"name": "')
    spec = StructuredOutputs(json=PERSON)
    so.add(-1, spec)
    try:
        from engine.core.outputs import ScheduledSeq

        m = so.backend.matcher(so.backend.compile(spec))
        first = ids[0]  # '{' ... then the rest of '{"name": "' as candidates on one path
        assert m.consume([first])
        so.advance(-1, [first])
        tree_size = max(eng._node_children)
        parents = eng.tree.parents  # (the full tree: this engine has no back-off)
        cands = [ids[1]] * tree_size
        deepest = max(range(tree_size + 1), key=lambda i: (len(eng.tree.choices[i - 1]) if i else 0))
        chain = []
        while deepest > 0:  # root to the deepest node
            chain.insert(0, deepest)
            deepest = parents[deepest]
        chain = chain[:len(ids) - 1]
        for i, node in enumerate(chain):
            cands[node - 1] = ids[1 + i]
        seq = ScheduledSeq(seq_id=-1, token_ids=[first], start_pos=0, block_table=[], sample=True,
                           tree_size=tree_size, candidates=list(cands), params=SamplingParams())
        so.prepare([seq], eng.tree_children)
        n = len(seq.grammar_bitmask) // (tree_size + 1)
        rows = [seq.grammar_bitmask[i * n:(i + 1) * n] for i in range(tree_size + 1)]
        assert rows[0] == m.bitmask()
        for depth, node in enumerate(chain):
            tok = seq.candidates[node - 1]
            assert _allowed(rows[parents[node]], tok)
            assert m.consume([tok])
            assert rows[node] == m.bitmask(), (depth, node)
        refused = [i for i in range(1, tree_size + 1) if not _allowed(rows[parents[i]], seq.candidates[i - 1])]
        assert all(rows[i] == b"\xff" * n for i in refused)
    finally:
        so.remove(-1)


def test_preemption_and_sampled_rules_keep_outputs_valid(bundled_dir):
    """A cache too small for the batch preempts and recomputes constrained requests: greedy
    outputs equal an unpressured engine's; sampled outputs under typical and rejection
    acceptance still satisfy their constraints."""
    roomy = Engine("default", kv_cache_memory_gb=0.25, speculative={"tree": "mc_sim_7b_63"})
    tight = Engine("default", num_blocks=16, block_size=16, max_num_seqs=8,
                   speculative={"tree": "mc_sim_7b_63"})
    prompts = PROMPTS + PROMPTS[:2]
    params = [SamplingParams(temperature=0, max_tokens=32, structured_outputs=CONSTRAINTS[i % len(CONSTRAINTS)])
              for i in range(len(prompts))]
    want = roomy.generate_batch(prompts, params, chat=True)
    got = tight.generate_batch(prompts, params, chat=True)
    assert tight.stats.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for rule in ("typical", "rejection"):
        sampled = [SamplingParams(temperature=0.8, seed=i, max_tokens=48, acceptance=rule,
                                  structured_outputs=CONSTRAINTS[(i + 2) % len(CONSTRAINTS)]) for i in range(4)]
        for p, o in zip(sampled, roomy.generate_batch(PROMPTS, sampled, chat=True)):
            if o.finish_reason == "stop":
                check_output(msg_dict(p.structured_outputs), o.text)
    for e in (roomy, tight):
        assert e.block_manager.num_used_blocks == 0  # nothing leaked
        assert len(e.structured) == 0
        e.shutdown()


def msg_dict(spec: StructuredOutputs) -> dict:
    return {spec.kind: getattr(spec, spec.kind)}


def test_aborting_a_constrained_request_frees_its_grammar(engines):
    eng = engines["medusa"]
    rid = eng.add_request("Tell me about Paris.", SamplingParams(max_tokens=32, structured_outputs={"json_object": True}))
    eng.step()
    assert len(eng.structured) == 1
    assert eng.abort(rid)
    assert len(eng.structured) == 0 and not eng.has_unfinished()


@pytest.fixture(scope="module")
def server(bundled_dir):
    eng = Engine("default", max_num_seqs=8, speculative={"tree": "mc_sim_7b_63"})
    from engine.entrypoints.server import build_app  # (here: the GPU machine has no FastAPI for the rest)
    from tests.serving import LoopbackServer

    with LoopbackServer(build_app(AsyncEngine(eng), "smol")) as srv:
        yield srv


def test_http_constraints_and_their_400s(server):
    url = server.url + "/v1"
    chat = {"model": "smol", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 64, "temperature": 0}
    r = httpx.post(url + "/chat/completions", timeout=120, json={
        **chat, "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                            "strict": True}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)
    for extra, check in [({"guided_choice": CHOICE}, {"choice": CHOICE}), ({"guided_regex": REGEX}, {"regex": REGEX}),
                         ({"structured_outputs": {"grammar": GRAMMAR}}, {"grammar": GRAMMAR})]:
        body = {"model": "smol", "prompt": "Q: Is water wet?\nA:", "max_tokens": 48, "temperature": 0, **extra}
        r = httpx.post(url + "/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        check_output(check, r.json()["choices"][0]["text"])
    # Streaming: the chunks join into a valid object.
    with httpx.stream("POST", url + "/chat/completions", timeout=120,
                      json={**chat, "stream": True, "response_format": {"type": "json_object"}}) as resp:
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in resp.iter_lines()
                       if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert isinstance(json.loads(text), dict)
    for extra, param in [({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                       "schema": {"type": "nope"}}}},
                          "response_format"),
                         ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
                         ({"response_format": {"type": "yaml"}}, "response_format"),
                         ({"guided_regex": "(("}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
                         ({"guided_json": "{nope"}, "guided_json"),
                         ({"structured_outputs": {"grammar": "root ::= nothing_here"}}, "structured_outputs"),
                         ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                         ({"guided_json": {"type": "object"}, "ignore_eos": True}, "ignore_eos")]:
        r = httpx.post(url + "/chat/completions", json={**chat, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_openai_sdk_response_format_and_parse(server):
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    out = client.chat.completions.create(model="smol", messages=msgs, max_tokens=64, temperature=0,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)

    class Person(pydantic.BaseModel):
        name: str
        age: int
        city: str

    parse = getattr(getattr(client, "chat", None).completions, "parse", None) or \
        getattr(getattr(getattr(client, "beta", None), "chat", None), "completions", None).parse
    parsed = parse(model="smol", messages=msgs, max_tokens=64, temperature=0, response_format=Person)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name
