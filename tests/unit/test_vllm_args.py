"""vLLM's own engine arguments through pdserve (pdserve/vllm_args.py): parsed by vLLM's
parser, only what was given, onto the engine's AsyncEngineArgs; per-pool flags and config
files for `serve`; GPU assignment per worker."""

import pytest

from pdserve import vllm_args
from pdserve.cli import engine_config, parse_args
from pdserve.engine import default_eager, engine_args
from pdserve.launcher import engine_argv, gpu_env, pool_argv

M = ["--model", "/models/m"]


def test_vllm_arguments_by_their_names_reach_the_engine_args():
    ns = parse_args(["decode", *M, "--max-logprobs", "5", "--no-enforce-eager",
                     "--long-prefill-token-threshold", "64", "--max-num-seqs", "7",
                     "--generation-config", "vllm"])
    # pdserve's own flags stay pdserve's; the rest is exactly what the user gave
    assert ns.vllm == {"max_logprobs": 5, "enforce_eager": False,
                       "long_prefill_token_threshold": 64, "generation_config": "vllm"}
    a = engine_args(engine_config(ns, "0"), kv_role="kv_both", kv_extra={"engine_id": "e"})
    assert (a.max_logprobs, a.enforce_eager, a.long_prefill_token_threshold,
            a.max_num_seqs) == (5, False, 64, 7)
    assert a.kv_transfer_config.kv_connector == "PDConnector"   # the connector stays ours


def test_defaults_are_pdserves_and_eager_only_without_a_gpu():
    a = engine_args(engine_config(parse_args(["prefill", *M]), "0"))
    assert a.enforce_eager == default_eager() and a.max_num_batched_tokens == 4096
    import torch
    assert default_eager() is (not torch.cuda.is_available())


@pytest.mark.parametrize("argv,why", [
    (["--kv-transfer-config", "{}"], "own KV connector"),
    (["--kv-cache-memory-bytes", "100"], "--kv-cache-gib"),
    (["--pipeline-parallel-size", "2"], "not supported yet"),
    (["--no-such-flag"], "unrecognized"),
    (["--max-logprobs", "many"], "invalid int"),
])
def test_bad_or_owned_vllm_arguments_exit_2_with_a_message(argv, why, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["serve", *M, *argv])
    assert e.value.code == 2 and why in capsys.readouterr().err


def test_commands_without_engines_take_no_vllm_arguments(capsys):
    with pytest.raises(SystemExit):
        parse_args(["scheduler", "--max-logprobs", "3"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_serve_hands_vllm_arguments_to_every_worker_and_pool_flags_to_one_pool(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_num_seqs: 16\nmax-logprobs: 4\nenforce_eager: true\n"
                   "prefill:\n  block_size: 64\n  long_prefill_token_threshold: 256\n"
                   "decode:\n  max_num_seqs: 8\n")
    ns = parse_args(["serve", *M, "--config", str(cfg), "--max-logprobs", "6",
                     "--decode-args", "--max-num-seqs 4"])
    assert ns.max_num_seqs == 16 and ns.vllm == {"max_logprobs": 6, "enforce_eager": True}
    shared = engine_argv(ns)
    # vLLM's arguments go on as given (the file's first, so the command line wins)
    assert shared[-5:] == ["--max-logprobs", "4", "--enforce-eager", "--max-logprobs", "6"]
    for role, want in (("prefill", {"block_size": 64, "max_num_seqs": 16,
                                    "long_prefill_token_threshold": 256}),
                       ("decode", {"block_size": 128, "max_num_seqs": 4})):
        w = parse_args([role, *shared, *pool_argv(ns, role)])
        a = engine_args(engine_config(w, "0"))
        # the command line wins over the file: max_logprobs 6 on both pools
        assert a.max_logprobs == 6 and a.enforce_eager is True
        for k, v in want.items():
            assert getattr(a, k) == v, (role, k)


def test_a_worker_reads_its_own_section_of_the_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_num_seqs: 16\ndecode:\n  max_num_seqs: 8\n  max_logprobs: 3\n")
    ns = parse_args(["decode", *M, "--config", str(cfg)])
    assert ns.max_num_seqs == 8 and ns.vllm == {"max_logprobs": 3}
    assert parse_args(["prefill", *M, "--config", str(cfg)]).max_num_seqs == 16


def test_config_values_become_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a_b: 1\nflag: true\nquiet: false\nnothing: null\n"
                   "obj: {x: 1}\nprefill: {y: 2}\n")
    assert vllm_args.config_argv(str(cfg)) == ["--a-b", "1", "--flag", "--no-quiet",
                                               "--obj", '{"x": 1}']
    assert vllm_args.config_argv(str(cfg), "prefill") == ["--y", "2"]
    assert vllm_args.config_argv(str(cfg), "decode") == []


def test_gpus_per_worker():
    assert gpu_env("", 0, "prefill") is None
    assert gpu_env("0,1", 1, "prefill") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert gpu_env("0+1, 2+3", 1, "decode") == {"CUDA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(SystemExit, match="names 2 worker"):
        gpu_env("0,1", 2, "decode")


def test_false_in_the_config_turns_off_pdserves_own_flags_and_vllms(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kv_checksum: true\nexpose_routing: true\nkeep_going: false\n"
                   "enable_prefix_caching: false\n")
    ns = parse_args(["serve", *M, "--config", str(cfg), "--no-expose-routing"])
    # the file's true holds; the command line's --no- wins over the file's true
    assert ns.kv_checksum is True and ns.expose_routing is False and ns.keep_going is False
    assert ns.vllm == {"enable_prefix_caching": False}
    assert parse_args(["decode", *M, "--config", str(cfg)]).kv_checksum is True


def test_one_config_file_serves_every_command_and_typos_still_fail(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("expose_routing: true\nmax_logprobs: 3\nmax_num_seqs: 8\n"
                   "policy: kv\n")
    # the frontend skips the engines' keys (pdserve's and vLLM's), the scheduler too
    assert parse_args(["frontend", *M, "--config", str(cfg)]).expose_routing is True
    assert parse_args(["scheduler", "--config", str(cfg)]).policy == "kv"
    ns = parse_args(["decode", *M, "--config", str(cfg)])
    assert ns.max_num_seqs == 8 and ns.vllm == {"max_logprobs": 3}
    cfg.write_text("max_num_seqz: 8\n")
    with pytest.raises(SystemExit) as e:
        parse_args(["decode", *M, "--config", str(cfg)])
    assert e.value.code == 2 and "max-num-seqz" in capsys.readouterr().err


def test_mixed_workers_start_mixed_with_their_pools_flags():
    from pdserve.launcher import worker_argv
    ns = parse_args(["serve", *M, "--mixed", "--decode-args", "--max-num-seqs 4"])
    argv = worker_argv(ns, "decode", "decode-0", "1", "127.0.0.1:1")
    i = argv.index("pdserve.cli")
    assert argv[i + 1] == "mixed" and argv[-2:] == ["--max-num-seqs", "4"]
    w = parse_args(argv[i + 1:])
    assert w.role == "mixed" and w.max_num_seqs == 4
    plain = parse_args(["serve", *M])
    assert worker_argv(plain, "prefill", "p", "0", "x")[i + 1] == "prefill"


def test_every_vllm_engine_argument_is_taken_by_serve_and_the_workers():
    """Each option of vLLM's own engine parser (AsyncEngineArgs.add_cli_args), with a value
    of its type, is accepted by `pdserve serve` and `pdserve decode`: into `ns.vllm`, or by
    the pdserve flag of the same name; only the arguments pdserve owns exit 2."""
    import argparse

    p = vllm_args.parser()
    tried = 0
    for a in p._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        opt = next(o for o in a.option_strings if o.startswith("--"))
        if a.nargs == 0:
            value = []
        elif a.choices:
            value = [str(next(iter(a.choices)))]
        elif a.type in (int, float):
            value = ["1"]
        else:
            continue       # strings and JSON: free-form, nothing of the type to try
        for cmd in ("serve", "decode"):
            argv = [cmd, *M, opt, *value]
            if a.dest in vllm_args.OWNED:
                with pytest.raises(SystemExit):
                    parse_args(argv)
                continue
            ns = parse_args(argv)
            assert a.dest in ns.vllm or opt.lstrip("-").replace("-", "_") in vars(ns), opt
            tried += 1
    assert tried > 250, tried     # 2 commands x ~150 typed options of 251 (vLLM 0.32)


def test_push_with_tensor_parallelism_is_refused_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["decode", *M, "--kv-mode", "push", "--tensor-parallel-size", "2"])
    assert e.value.code == 2 and "needs tensor parallel size 1" in capsys.readouterr().err
    # serve checks each pool's flags the same way before anything starts
    from pdserve.launcher import check_pool_args
    ns = parse_args(["serve", *M, "--kv-mode", "push", "--prefill-args",
                     "--tensor-parallel-size 2"])
    with pytest.raises(SystemExit):
        check_pool_args(ns, parse_args)
    assert parse_args(["decode", *M, "--tensor-parallel-size", "2"]).vllm == {
        "tensor_parallel_size": 2}


def test_one_rank_on_cpu_runs_vllms_worker_in_the_engine_core(tmp_path):
    """At one rank on CPU the engine takes vLLM's uniprocess executor (no worker process);
    with ranks, or an executor the user named, vLLM's own choice stands."""
    import os

    from pdserve.engine import engine_config as vllm_config
    from pdserve.engine import one_process
    from pdserve.models import build_tiny_model

    model = str(build_tiny_model(tmp_path / "tiny"))
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    c = vllm_config(engine_args(engine_config(parse_args(["decode", "--model", model]), "0")))
    assert c.parallel_config.distributed_executor_backend == "uni"
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == before   # restored
    tp2 = engine_args(engine_config(parse_args(
        ["decode", "--model", model, "--tensor-parallel-size", "2"]), "0"))
    named = engine_args(engine_config(parse_args(
        ["decode", "--model", model, "--distributed-executor-backend", "mp"]), "0"))
    assert not one_process(tp2) and not one_process(named)
    assert one_process(engine_args(engine_config(parse_args(["decode", "--model", model]), "0")))
    c = vllm_config(named)
    assert c.parallel_config.distributed_executor_backend == "mp"


def test_chat_template_flags_reach_the_frontend_as_vllms():
    """`pdserve serve` takes vLLM's chat-template flags and hands them to its frontend."""
    from pdserve.launcher import http_argv

    ns = parse_args(["serve", *M, "--chat-template", "{{ messages }}",
                     "--trust-request-chat-template", "--enable-force-include-usage",
                     "--default-chat-template-kwargs", '{"enable_thinking": false}'])
    fe = parse_args(["frontend", *http_argv(ns)])
    assert fe.chat_template == "{{ messages }}" and fe.trust_request_chat_template
    assert fe.default_chat_template_kwargs == {"enable_thinking": False}
    assert fe.enable_force_include_usage and not parse_args(["frontend"]).enable_force_include_usage
    assert not parse_args(["frontend"]).trust_request_chat_template     # off by default
    for bad in ("[1]", "not json"):
        with pytest.raises(SystemExit):
            parse_args(["frontend", "--default-chat-template-kwargs", bad])


def test_the_reasoning_parser_reaches_both_the_engines_and_the_frontend():
    """vLLM's --reasoning-parser is an engine argument; `serve` hands it to its frontend too."""
    from pdserve.launcher import http_argv

    ns = parse_args(["serve", *M, "--reasoning-parser", "deepseek_v3"])
    assert ns.vllm["reasoning_parser"] == "deepseek_v3"
    assert parse_args(["frontend", *http_argv(ns)]).reasoning_parser == "deepseek_v3"
    assert not parse_args(["frontend", *http_argv(parse_args(["serve", *M]))]).reasoning_parser


def test_the_generation_config_flags_reach_the_frontend():
    """vLLM's --generation-config and --override-generation-config are engine arguments;
    vLLM's server applies them to requests, so `serve` hands them to its frontend."""
    import json

    from frontend.gen_config import parse_override
    from pdserve.launcher import http_argv

    ns = parse_args(["serve", *M, "--generation-config", "vllm",
                     "--override-generation-config", '{"temperature": 0.5}'])
    fe = parse_args(["frontend", *http_argv(ns)])
    assert fe.generation_config == "vllm"
    assert parse_override(fe.override_generation_config) == {"temperature": 0.5}
    fe = parse_args(["frontend", *http_argv(parse_args(["serve", *M]))])
    assert (fe.generation_config, parse_override(fe.override_generation_config)) == ("auto", {})
    with pytest.raises(ValueError):
        parse_override(json.dumps([1]))
