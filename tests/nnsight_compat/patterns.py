# ruff: noqa: B007, B018, F841 - the pages' code, verbatim: unused loop steps and names are theirs
"""NNsight's documented patterns, transcribed for SmolLM2 (`model.model.layers`, `model.model.norm`,
`self_attn`, `model.config.hidden_size`), one function each.

Each function body is the page's code with only the module paths adapted; the caller passes the
module NNsight's `import nnsight` names (`nnsight` itself, or `farscope`) and the model (an NNsight
`LanguageModel`, or a `farscope.RemoteModel`): the import line and the model line are the only
difference between the two runs. Each returns the values the page prints or saves, by name.

This file imports neither nnsight nor farscope, so `bench/nnsight_reference.py` runs it in NNsight's
venv and `tests/nnsight_compat/` runs it against a farscope server. It has to be a real file: NNsight
reads the source of each `with` block. `SOURCES` names the page each pattern comes from.

Where a page's code fails under NNsight 0.8.1 itself, the transcription follows NNsight's own rules
and says so: reads in execution order (NNsight raises OutOfOrderError otherwise), and lists made inside
a block created with `nnsight.save([])` (0.8.1 lets only saved objects out of a block).
"""

from __future__ import annotations

import torch

PATTERNS: dict = {}
SOURCES: dict[str, str] = {}


def pattern(source: str):
    def register(fn):
        PATTERNS[fn.__name__] = fn
        SOURCES[fn.__name__] = source
        return fn
    return register


# -- docs/usage/trace.md, access-and-modify.md ---------------------------------------------------


@pattern("docs/usage/trace.md: ablate, read, read logits (the page reads layer -1 before writing layer 0, "
         "which NNsight 0.8.1 refuses as out of order: written here in execution order)")
def trace_read_ablate(nnsight, model):
    with model.trace("Hello world"):
        model.model.layers[0].output[:] = 0
        hidden = model.model.layers[-1].output.save()
        logits = model.lm_head.output.save()
    return {"hidden": hidden, "logits": logits}


@pattern("docs/usage/trace.md: implicit and explicit invoke")
def trace_implicit_and_explicit_invoke(nnsight, model):
    with model.trace("Hello"):
        out = model.lm_head.output.save()
    with model.trace() as tracer:
        with tracer.invoke("Hello"):
            out2 = model.lm_head.output.save()
    return {"implicit": out, "explicit": out2}


@pattern("docs/usage/trace.md: remote=True")
def trace_remote(nnsight, model):
    with model.trace("Hello", remote=True):
        out = model.lm_head.output.save()
    return {"out": out}


@pattern("docs/usage/save.md: nnsight.save and .save()")
def save_function_and_method(nnsight, model):
    with model.trace("Hello"):
        hidden = nnsight.save(model.model.layers[-1].output)
        logits = model.lm_head.output.save()
    return {"hidden": hidden, "logits": logits, "shapes": [list(hidden.shape), list(logits.shape)]}


@pattern("docs/usage/save.md: remote trace, detach().cpu().save()")
def save_detach_cpu(nnsight, model):
    with model.trace("Hello", remote=True):
        out = model.lm_head.output.detach().cpu().save()
    return {"out": out}


@pattern("docs/usage/access-and-modify.md: in-place and replacement (in execution order)")
def modify_inplace_and_replace(nnsight, model):
    with model.trace("Hello"):
        model.model.layers[0].output[:] = 0
        hidden = model.model.layers[-1].output.save()
    with model.trace("Hello"):
        layer0 = model.model.layers[0].output
        model.model.layers[0].output = torch.zeros_like(layer0)
        replaced = model.lm_head.output.save()
    return {"hidden": hidden, "replaced": replaced}


@pattern("docs/usage/access-and-modify.md: clone before modifying")
def modify_clone_before(nnsight, model):
    with model.trace("Hello"):
        before = model.model.layers[0].output.clone().save()
        model.model.layers[0].output[:] = 0
        after = model.model.layers[0].output.save()
    return {"before": before, "after": after}


@pattern("docs/usage/access-and-modify.md: calling modules out of order")
def modify_module_call(nnsight, model):
    with model.trace("Hello"):
        hs = model.model.layers[5].output
        logits = model.lm_head(model.model.norm(hs)).save()
    return {"logits": logits}


@pattern("docs/usage/access-and-modify.md: attention output tuple, first element")
def modify_attention_tuple(nnsight, model):
    with model.trace("Hello"):
        full = model.model.layers[0].self_attn.output
        attn_out = full[0].save()
        model.model.layers[0].self_attn.output[0][:] = 0
        logits = model.lm_head.output.save()
    return {"attn_out": attn_out, "logits": logits}


# -- docs/usage/invoke-and-batching.md, barrier.md -----------------------------------------------


@pattern("docs/usage/invoke-and-batching.md: two invokes")
def invoke_two_prompts(nnsight, model):
    with model.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            out_paris = model.lm_head.output[:, -1].save()
        with tracer.invoke("The Colosseum is in"):
            out_rome = model.lm_head.output[:, -1].save()
    return {"paris": out_paris, "rome": out_rome}


@pattern("docs/usage/invoke-and-batching.md: a list of prompts as the trace input")
def invoke_batched_list(nnsight, model):
    with model.trace(["Hello", "World"]):
        logits = model.lm_head.output.save()
    return {"logits": logits}


@pattern("docs/usage/invoke-and-batching.md: list invoke and empty invoke")
def invoke_list_and_empty(nnsight, model):
    with model.trace() as tracer:
        with tracer.invoke("Hello"):
            out_a = model.lm_head.output[:, -1].save()
        with tracer.invoke(["World", "Test"]):
            out_b = model.lm_head.output[:, -1].save()
        with tracer.invoke():
            out_all = model.lm_head.output[:, -1].save()
    return {"a": out_a, "b": out_b, "all": out_all}


@pattern("docs/usage/invoke-and-batching.md: empty invoke reads another module")
def invoke_empty_other_module(nnsight, model):
    with model.trace() as tracer:
        with tracer.invoke("Hello"):
            layer5 = model.model.layers[5].output.save()
        with tracer.invoke():
            layer1 = model.model.layers[1].output.save()
    return {"layer5": layer5, "layer1": layer1}


@pattern("docs/usage/barrier.md: activation patching across invokes")
def barrier_patching(nnsight, model):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke("The Eiffel Tower is in"):
            clean_hs = model.model.layers[5].output[:, -1, :]
            barrier()
        with tracer.invoke("The Colosseum is in"):
            barrier()
            model.model.layers[5].output[:, -1, :] = clean_hs
            patched = model.lm_head.output.save()
    return {"patched": patched}


@pattern("docs/patterns/multi-prompt-comparison.md: invokes in a Python loop")
def invoke_loop_over_prompts(nnsight, model):
    prompts = ["The cat sat on the", "A dog ran on the", "The bird flew on the"]
    with model.trace() as tracer:
        last_logits = nnsight.save([])
        for p in prompts:
            with tracer.invoke(p):
                last_logits.append(model.lm_head.output[:, -1, :].save())
    return {"tokens": [model.tokenizer.decode(lg.argmax(-1)[0]) for lg in last_logits],
            "logits": last_logits}


@pattern("docs/patterns/multi-prompt-comparison.md: contrast direction from invokes")
def invoke_contrast_direction(nnsight, model):
    positive = ["I love this", "This is wonderful"]
    negative = ["I hate this", "This is awful"]
    LAYER = 6
    with model.trace() as tracer:
        pos_a, neg_a = nnsight.save([]), nnsight.save([])
        for p in positive:
            with tracer.invoke(p):
                pos_a.append(model.model.layers[LAYER].output[:, -1, :].save())
        for p in negative:
            with tracer.invoke(p):
                neg_a.append(model.model.layers[LAYER].output[:, -1, :].save())
    pos = torch.cat([a for a in pos_a]).mean(0)
    neg = torch.cat([a for a in neg_a]).mean(0)
    direction = pos - neg
    return {"direction": direction}


# -- docs/usage/generate.md, iter-all-next.md ----------------------------------------------------


@pattern("docs/usage/generate.md: a hidden state and tracer.result (in execution order)")
def generate_result(nnsight, model):
    with model.generate("Hello", max_new_tokens=5) as tracer:
        last_hidden = model.model.layers[-1].output.save()
        output = tracer.result.save()
    return {"output": output, "text": model.tokenizer.decode(output[0]), "last_hidden": last_hidden}


@pattern("docs/usage/generate.md: model.generator.output")
def generate_generator_output(nnsight, model):
    with model.generate("Hello", max_new_tokens=5):
        output = model.generator.output.save()
    return {"output": output}


@pattern("docs/usage/generate.md: remote=True")
def generate_remote(nnsight, model):
    with model.generate("Hello", max_new_tokens=5, remote=True) as tracer:
        output = tracer.result.save()
    return {"output": output}


@pattern("docs/usage/generate.md: list().save() per step")
def generate_list_save_per_step(nnsight, model):
    with model.generate("Hello", max_new_tokens=5) as tracer:
        logits_per_step = list().save()
        for step in tracer.iter[:]:
            logits_per_step.append(model.lm_head.output[0, -1].argmax(dim=-1))
    return {"tokens": logits_per_step}


@pattern("docs/usage/iter-all-next.md: tracer.iter[0], the prefill step")
def iter_single_step(nnsight, model):
    with model.generate("Hello", max_new_tokens=5) as tracer:
        for step in tracer.iter[0]:
            first = model.lm_head.output.save()
    return {"first": first}


@pattern("docs/usage/iter-all-next.md: tracer.all() zero-ablating every step")
def iter_all_ablate(nnsight, model):
    with model.generate("Hello", max_new_tokens=3) as tracer:
        hidden_states = list().save()
        for step in tracer.all():
            model.model.layers[0].output[:] = 0
            hidden_states.append(model.model.layers[-1].output)
    return {"hidden_states": hidden_states}


@pattern("docs/usage/iter-all-next.md: per-step Python if on the step index (NNsight runs nothing after an "
         "unbounded tracer.iter[:] loop, so the tokens are collected inside it)")
def iter_if_on_step(nnsight, model):
    with model.generate("Hello", max_new_tokens=5) as tracer:
        tokens = nnsight.save([])
        for step in tracer.iter[:]:
            if step == 2:
                model.model.layers[0].output[:] = 0
            tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
    return {"tokens": tokens}


@pattern("NNsight 0.4 walkthrough: `with tracer.iter[...]:` context-manager form")
def iter_with_form(nnsight, model):
    with model.generate("Hello", max_new_tokens=3) as tracer:
        tokens = nnsight.save([])
        with tracer.iter[:]:
            model.model.layers[0].output[:] = 0
            tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
    return {"tokens": tokens}


# -- docs/usage/session.md -----------------------------------------------------------------------


@pattern("docs/usage/session.md: a value from one trace used in the next")
def session_value_between_traces(nnsight, model):
    with model.session() as session:
        with model.trace("Hello"):
            hs = model.model.layers[0].output.save()
        with model.trace("World"):
            model.model.layers[0].output[:] = hs
            out = model.lm_head.output.save()
    return {"hs": hs, "out": out}


@pattern("docs/usage/session.md: remote session, patching and decoding saved token ids")
def session_remote_patching(nnsight, model):
    with model.session(remote=True):
        with model.trace("Megan Rapinoe plays the sport of"):
            hs = model.model.layers[5].output[:, -1, :]
        with model.trace("Shaquille O'Neal plays the sport of"):
            clean = model.lm_head.output[0][-1].argmax(dim=-1).save()
        with model.trace("Shaquille O'Neal plays the sport of"):
            model.model.layers[5].output[:, -1, :] = hs
            patched = model.lm_head.output[0][-1].argmax(dim=-1).save()
    return {"clean": clean, "patched": patched,
            "decoded": [model.tokenizer.decode(clean), model.tokenizer.decode(patched)]}


@pattern("docs/usage/session.md: list().save() over a loop of traces")
def session_list_over_traces(nnsight, model):
    prompts = ["Hello", "World", "Test"]
    with model.session():
        results = list().save()
        for prompt in prompts:
            with model.trace(prompt):
                results.append(model.lm_head.output.argmax(dim=-1))
    return {"results": results}


@pattern("docs/usage/session.md: plain Python between traces (its result saved: 0.8.1 lets only saved "
         "values out of a session)")
def session_python_between_traces(nnsight, model):
    with model.session():
        with model.trace("Hello"):
            hs = model.model.layers[0].output
        shape = nnsight.save(list(hs.shape))
        with model.trace("World"):
            model.model.layers[0].output[:] = hs
            out = model.lm_head.output.save()
    return {"shape": shape, "out": out}


@pattern("nnsight.net function vectors tutorial: Python between the traces of a session (a mean of "
         "activations, used by the next trace)")
def session_mean_between_traces(nnsight, model):
    with model.session():
        with model.trace("The Eiffel Tower is in the city of"):
            h1 = model.model.layers[5].output[:, -1]
        with model.trace("The Colosseum is in the city of"):
            h2 = model.model.layers[5].output[:, -1]
        fv = torch.cat([h1, h2]).mean(0)
        with model.trace("The Louvre is in the city of"):
            model.model.layers[5].output[:, -1] += fv
            out = model.lm_head.output[:, -1].save()
        norm = nnsight.save(fv.norm())
    return {"out": out, "norm": norm}


@pattern("docs/patterns/steering.md: contrast direction in a session, Python after it")
def session_steering_direction(nnsight, model):
    positive = ["I love this so much", "This is wonderful", "I am very happy"]
    negative = ["I hate this so much", "This is terrible", "I am very sad"]
    LAYER = 6
    with model.session():
        pos_acts = nnsight.save([])
        neg_acts = nnsight.save([])
        with model.trace() as tracer:
            for p in positive:
                with tracer.invoke(p):
                    pos_acts.append(model.model.layers[LAYER].output[:, -1, :].save())
            for p in negative:
                with tracer.invoke(p):
                    neg_acts.append(model.model.layers[LAYER].output[:, -1, :].save())
    pos = torch.cat([a for a in pos_acts], dim=0).mean(0)
    neg = torch.cat([a for a in neg_acts], dim=0).mean(0)
    direction = (pos - neg)
    direction = direction / direction.norm()
    return {"direction": direction}


# -- docs/usage/skip.md, stop-and-early-exit.md, edit.md -------------------------------------------


@pattern("docs/usage/skip.md: skip a layer with an earlier layer's output")
def skip_layer(nnsight, model):
    with model.trace("Hello"):
        layer0_out = model.model.layers[0].output
        model.model.layers[1].skip(layer0_out)
        layer1_out = model.model.layers[1].output.save()
    return {"layer1_out": layer1_out}


@pattern("docs/usage/skip.md: skip with zeros shaped like the input")
def skip_with_zeros(nnsight, model):
    with model.trace("Hello"):
        inp = model.model.layers[3].input
        model.model.layers[3].skip(torch.zeros_like(inp))
        logits = model.lm_head.output.save()
    return {"logits": logits}


@pattern("docs/usage/stop-and-early-exit.md: stop after the first layer")
def stop_early(nnsight, model):
    with model.trace("Hello") as tracer:
        h0 = model.model.layers[0].output.save()
        tracer.stop()
    return {"h0": h0, "shape": list(h0.shape)}


@pattern("docs/usage/stop-and-early-exit.md: stop on EOS with a Python if")
def stop_on_eos(nnsight, model):
    with model.generate("Hello", max_new_tokens=20) as tracer:
        for step in tracer.iter[:]:
            tok = model.lm_head.output[0, -1].argmax(dim=-1).save()
            if tok.item() == model.tokenizer.eos_token_id:
                tracer.stop()
    return {"tok": tok}


@pattern("docs/usage/edit.md: a non-inplace edit leaves the original model alone (bound as NNsight 0.8.1's "
         "Envoy.edit docstring has it, `as (tracer, edited_model)`: the page's `as edited_model` is older)")
def edit_copy(nnsight, model):
    with model.edit() as (tracer, edited_model):
        edited_model.model.layers[1].output[:, 1] = 0
    with model.trace("Hello world"):
        out_original = model.model.layers[1].output.save()
    with edited_model.trace("Hello world"):
        out_edited = edited_model.model.layers[1].output.save()
    return {"original": out_original, "edited": out_edited}


@pattern("docs/usage/edit.md: in-place edits, two of them, then clear_edits")
def edit_inplace(nnsight, model):
    with model.edit(inplace=True):
        model.model.layers[0].output[:] = 0
    with model.edit(inplace=True):
        model.model.layers[1].output[:] = 0
    with model.trace("Hello"):
        out = model.model.layers[1].output.save()
        logits = model.lm_head.output.save()
    model.clear_edits()
    with model.trace("Hello"):
        clean = model.model.layers[1].output.save()
    return {"out": out, "logits": logits, "clean": clean}


@pattern("docs/usage/skip.md: an in-place edit that always skips a layer")
def edit_inplace_skip(nnsight, model):
    with model.edit(inplace=True):
        inp = model.model.layers[1].input
        model.model.layers[1].skip(inp)
    with model.trace("Hello"):
        out = model.lm_head.output.save()
    model.clear_edits()
    return {"out": out}


# -- docs/usage/backward-and-grad.md, docs/patterns/*attribution*.md -------------------------------


@pattern("docs/usage/backward-and-grad.md: gradient of a hidden state")
def backward_grad(nnsight, model):
    with model.trace("Hello"):
        hs = model.model.layers[-1].output
        hs.requires_grad_(True)
        logits = model.lm_head.output
        loss = logits.sum()
        with loss.backward():
            grad = hs.grad.save()
    return {"grad": grad}


@pattern("docs/usage/backward-and-grad.md: read then zero a gradient")
def backward_grad_modify(nnsight, model):
    with model.trace("Hello"):
        hs = model.model.layers[-1].output
        hs.requires_grad_(True)
        logits = model.lm_head.output
        with logits.sum().backward():
            hs_grad = hs.grad.clone().save()
            hs.grad[:] = 0
    return {"hs_grad": hs_grad}


@pattern("docs/usage/backward-and-grad.md: two backward passes, retain_graph")
def backward_twice(nnsight, model):
    with model.trace("Hello"):
        hs = model.model.layers[-1].output
        hs.requires_grad_(True)
        logits = model.lm_head.output
        with logits.sum().backward(retain_graph=True):
            grad1 = hs.grad.save()
        modified = logits * 2
        with modified.sum().backward():
            grad2 = hs.grad.save()
    return {"grad1": grad1, "grad2": grad2}


@pattern("docs/usage/backward-and-grad.md: backward after the trace, on saved values")
def backward_after_trace(nnsight, model):
    with model.trace("Hello"):
        hs = model.model.layers[-1].output
        hs.requires_grad_(True)
        hs = hs.save()
        logits = model.lm_head.output.save()
    loss = logits.sum()
    with loss.backward():
        grad = hs.grad.save()
    return {"grad": grad}


@pattern("docs/patterns/gradient-based-attribution.md: residual gradients at every layer")
def attribution_residual_grads(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    target = model.tokenizer.encode(" Paris")[0]
    n_layers = len(model.model.layers)
    residual_grads = [None] * n_layers
    with model.trace(prompt):
        refs = []
        for L in range(n_layers):
            hs = model.model.layers[L].output
            hs.requires_grad_(True)
            refs.append(hs)
        metric = model.lm_head.output[:, -1, target]
        with metric.sum().backward():
            for L in reversed(range(n_layers)):
                residual_grads[L] = refs[L].grad.save()
    return {"norms": [g[:, -1, :].norm().item() for g in residual_grads]}


@pattern("docs/patterns/gradient-based-attribution.md: input x gradient saliency")
def attribution_saliency(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    target = model.tokenizer.encode(" Paris")[0]
    with model.trace(prompt):
        embeds = model.model.embed_tokens.output
        embeds.requires_grad_(True)
        embeds_save = embeds.save()
        metric = model.lm_head.output[:, -1, target]
        with metric.sum().backward():
            grad = embeds.grad.save()
    saliency = (embeds_save * grad).sum(dim=-1).abs()
    return {"saliency": saliency}


@pattern("docs/patterns/attribution-patching.md: attribution per layer (gradients read last layer first, "
         "as backward visits them: NNsight 0.8.1 refuses the page's forward order)")
def attribution_patching(nnsight, model):
    clean = "The Eiffel Tower is in the city of"
    corrupt = "The Colosseum is in the city of"
    paris = model.tokenizer.encode(" Paris")[0]
    rome = model.tokenizer.encode(" Rome")[0]
    n_layers = len(model.model.layers)
    clean_acts = [None] * n_layers
    with model.trace(clean):
        for L in range(n_layers):
            clean_acts[L] = model.model.layers[L].output.save()
    corrupt_acts = [None] * n_layers
    corrupt_grads = [None] * n_layers
    with model.trace(corrupt):
        hidden_refs = []
        for L in range(n_layers):
            hs = model.model.layers[L].output
            hs.requires_grad_(True)
            hidden_refs.append(hs)
            corrupt_acts[L] = hs.save()
        logits = model.lm_head.output[:, -1, :]
        metric = logits[:, paris] - logits[:, rome]
        with metric.sum().backward():
            for L, hs in reversed(list(enumerate(hidden_refs))):
                corrupt_grads[L] = hs.grad.save()
    attribution = torch.tensor([
        ((clean_acts[L] - corrupt_acts[L]) * corrupt_grads[L]).sum().item()
        for L in range(n_layers)
    ])
    return {"attribution": attribution}


# -- docs/usage/cache.md ---------------------------------------------------------------------------


@pattern("docs/usage/cache.md: every module, by key and by attribute")
def cache_all(nnsight, model):
    with model.trace("Hello") as tracer:
        cache = tracer.cache()
    return {"by_key": cache['model.model.layers.0'].output,
            "by_attribute": cache.model.model.layers[0].output,
            "lm_head": cache['model.lm_head'].output}


@pattern("docs/usage/cache.md: chosen modules, envoys and a path")
def cache_chosen(nnsight, model):
    with model.trace("Hello") as tracer:
        cache = tracer.cache(modules=[
            model.model.layers[0],
            model.model.layers[5],
            "model.lm_head",
        ])
    return {"keys": sorted(cache.keys()), "layer5": cache['model.model.layers.5'].output,
            "lm_head": cache['model.lm_head'].output}


@pattern("docs/usage/cache.md: include_inputs")
def cache_inputs(nnsight, model):
    with model.trace("Hello") as tracer:
        cache = tracer.cache(include_inputs=True)
    inputs = cache['model.model.layers.0'].inputs
    first = cache['model.model.layers.0'].input
    return {"args0": inputs[0][0], "first": first}


@pattern("docs/usage/cache.md: a cached value sees a later in-place edit")
def cache_then_edit(nnsight, model):
    with model.trace("Hello") as tracer:
        cache = tracer.cache()
        model.model.layers[0].output[:] = 0
    return {"layer0": cache['model.model.layers.0'].output}


@pattern("docs/usage/cache.md: an unknown key raises KeyError")
def cache_missing_key(nnsight, model):
    with model.trace("Hello") as tracer:
        cache = tracer.cache(modules=[model.model.layers[0]])
    try:
        cache['model.model.layers.1'].output
        caught = None
    except KeyError:
        caught = "KeyError"
    return {"caught": caught}


# -- docs/usage/conditionals-and-loops.md ----------------------------------------------------------


@pattern("docs/usage/conditionals-and-loops.md: if on a traced value")
def conditional_if(nnsight, model):
    with model.trace("Hello"):
        output = model.model.layers[0].output
        if torch.all(output < 1e5):
            model.model.layers[-1].output[:] = 0
        final = model.model.layers[-1].output.save()
    return {"final": final}


@pattern("docs/usage/conditionals-and-loops.md: if on a norm")
def conditional_norm(nnsight, model):
    with model.trace("Hello"):
        hs = model.model.layers[5].output
        norm = hs.norm(dim=-1).mean()
        if norm > 10.0:
            model.model.layers[6].output[:] = 0
        final = model.lm_head.output.save()
    return {"final": final}


@pattern("docs/usage/conditionals-and-loops.md: loop over layers into list().save()")
def loop_layers_list_save(nnsight, model):
    with model.trace("Hello"):
        activations = list().save()
        for i in range(len(model.model.layers)):
            activations.append(model.model.layers[i].output)
    return {"activations": activations}


@pattern("docs/usage/conditionals-and-loops.md: comprehension, then nnsight.save(list)")
def loop_comprehension_save(nnsight, model):
    with model.trace("Hello"):
        means = [model.model.layers[i].output.mean() for i in range(12)]
        means = nnsight.save(means)
    return {"means": means}


@pattern("docs/usage/conditionals-and-loops.md: a helper function on traced values")
def loop_helper_function(nnsight, model):
    def normalize(x):
        return (x - x.mean()) / x.std()

    with model.trace("Hello"):
        out = model.model.layers[0].output
        norm = normalize(out).save()
    return {"norm": norm}


# -- docs/patterns: ablation, steering, logit lens, activation patching ----------------------------


@pattern("docs/patterns/ablation.md: zero an MLP in one of two invokes")
def ablation_mlp(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    LAYER = 9
    with model.trace() as tracer:
        with tracer.invoke(prompt):
            baseline_logits = model.lm_head.output[:, -1, :].save()
        with tracer.invoke(prompt):
            model.model.layers[LAYER].mlp.output[:] = 0
            ablated_logits = model.lm_head.output[:, -1, :].save()
    paris = model.tokenizer.encode(" Paris")[0]
    return {"baseline": f"{baseline_logits.softmax(-1)[0, paris]:.3f}",
            "ablated": f"{ablated_logits.softmax(-1)[0, paris]:.3f}",
            "baseline_logits": baseline_logits, "ablated_logits": ablated_logits}


@pattern("docs/patterns/ablation.md: last position, and one feature")
def ablation_position_and_feature(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    LAYER = 9
    with model.trace(prompt):
        model.model.layers[LAYER].mlp.output[:, -1, :] = 0
        logits = model.lm_head.output[:, -1, :].save()
    with model.trace(prompt):
        feature_idx = 123
        model.model.layers[LAYER].mlp.output[:, :, feature_idx] = 0
        logits2 = model.lm_head.output[:, -1, :].save()
    return {"position": logits, "feature": logits2}


@pattern("docs/patterns/ablation.md: mean ablation from invokes")
def ablation_mean(nnsight, model):
    ref_prompts = ["The capital of France is", "Paris is in", "Berlin lies in", "London hosts the"]
    LAYER = 9
    acts = []
    with model.trace() as tracer:
        for p in ref_prompts:
            with tracer.invoke(p):
                acts.append(model.model.layers[LAYER].mlp.output[:, -1, :])
    mean_act = torch.stack([a for a in acts], dim=0).mean(dim=0)
    prompt = "The Eiffel Tower is in the city of"
    with model.trace(prompt):
        model.model.layers[LAYER].mlp.output[:, -1, :] = mean_act
        logits = model.lm_head.output[:, -1, :].save()
    return {"logits": logits}


@pattern("docs/patterns/ablation.md: zero one attention head (shapes while recording)")
def ablation_head(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    LAYER = 9
    n_heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // n_heads
    with model.trace(prompt):
        attn_out = model.model.layers[LAYER].self_attn.output[0]
        B, S, _ = attn_out.shape
        reshaped = attn_out.view(B, S, n_heads, head_dim).clone()
        reshaped[:, :, 4, :] = 0
        new_attn = reshaped.view(B, S, n_heads * head_dim)
        model.model.layers[LAYER].self_attn.output = (new_attn,) + model.model.layers[LAYER].self_attn.output[1:]
        logits = model.lm_head.output[:, -1, :].save()
    return {"logits": logits}


@pattern("docs/patterns/steering.md: add a direction at the last position")
def steering_invokes(nnsight, model):
    LAYER = 6
    hidden = model.config.hidden_size
    torch.manual_seed(0)
    direction = torch.randn(hidden, device=model.device)
    direction = direction / direction.norm()
    coef = 4.0
    prompt = "I went to the bakery and"
    with model.trace() as tracer:
        with tracer.invoke(prompt):
            baseline = model.lm_head.output[:, -1, :].save()
        with tracer.invoke(prompt):
            model.model.layers[LAYER].output[:, -1, :] += direction * coef
            steered = model.lm_head.output[:, -1, :].save()
    return {"baseline": baseline, "steered": steered,
            "tokens": [model.tokenizer.decode(baseline.argmax(-1)[0]),
                       model.tokenizer.decode(steered.argmax(-1)[0])]}


@pattern("docs/patterns/steering.md: several layers, and during generation")
def steering_layers_and_generate(nnsight, model):
    torch.manual_seed(0)
    direction = torch.randn(model.config.hidden_size)
    direction = direction / direction.norm()
    coef = 4.0
    prompt = "I went to the bakery and"
    LAYER = 6
    with model.trace(prompt):
        for L in [4, 5, 6, 7]:
            model.model.layers[L].output[:, -1, :] += direction * (coef / 4)
        out = model.lm_head.output.save()
    with model.generate(prompt, max_new_tokens=5) as tracer:
        model.model.layers[LAYER].output[:, -1, :] += direction * coef
        tokens = tracer.result.save()
    return {"out": out, "tokens": tokens}


@pattern("docs/patterns/logit-lens.md: top token at every layer")
def logit_lens_top(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    with model.trace(prompt):
        layer_top_tokens = nnsight.save([])
        for block in model.model.layers:
            hs = block.output
            logits = model.lm_head(model.model.norm(hs))
            top_tok = logits[:, -1, :].argmax(dim=-1).save()
            layer_top_tokens.append(top_tok)
    return {"tokens": [model.tokenizer.decode(tok[0]) for tok in layer_top_tokens]}


@pattern("docs/patterns/logit-lens.md: top-5 at every layer")
def logit_lens_topk(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    with model.trace(prompt):
        per_layer_topk = nnsight.save([])
        for block in model.model.layers:
            hs = block.output
            logits = model.lm_head(model.model.norm(hs))
            topk = logits[:, -1, :].topk(5, dim=-1).indices.save()
            per_layer_topk.append(topk)
    return {"decoded": [[model.tokenizer.decode(t) for t in topk[0]] for topk in per_layer_topk]}


@pattern("docs/patterns/logit-lens.md: a target token's probability at every layer")
def logit_lens_target_prob(nnsight, model):
    prompt = "The Eiffel Tower is in the city of"
    target = " Paris"
    target_id = model.tokenizer.encode(target)[0]
    with model.trace(prompt):
        target_probs = nnsight.save([])
        for block in model.model.layers:
            hs = block.output
            logits = model.lm_head(model.model.norm(hs))
            prob = logits[:, -1, :].softmax(dim=-1)[:, target_id].save()
            target_probs.append(prob)
    return {"probs": [f"{p.item():.3f}" for p in target_probs], "raw": [p.item() for p in target_probs]}


@pattern("docs/patterns/activation-patching.md: patched and baseline invokes")
def activation_patching(nnsight, model):
    clean = "The Eiffel Tower is in the city of"
    corrupt = "The Colosseum is in the city of"
    LAYER = 7
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            clean_hs = model.model.layers[LAYER].output[:, -1, :]
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            model.model.layers[LAYER].output[:, -1, :] = clean_hs
            patched_logits = model.lm_head.output[:, -1, :].save()
        with tracer.invoke(corrupt):
            baseline_logits = model.lm_head.output[:, -1, :].save()
    paris = model.tokenizer.encode(" Paris")[0]
    rome = model.tokenizer.encode(" Rome")[0]
    return {"baseline": [f"{baseline_logits.softmax(-1)[0, paris]:.3f}", f"{baseline_logits.softmax(-1)[0, rome]:.3f}"],
            "patched": [f"{patched_logits.softmax(-1)[0, paris]:.3f}", f"{patched_logits.softmax(-1)[0, rome]:.3f}"],
            "patched_logits": patched_logits}


@pattern("docs/patterns/activation-patching.md: a sweep over layers, one trace each")
def activation_patching_sweep(nnsight, model):
    clean = "The Eiffel Tower is in the city of"
    corrupt = "The Colosseum is in the city of"
    paris = model.tokenizer.encode(" Paris")[0]
    results = {}
    for layer in range(0, len(model.model.layers), 6):
        with model.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(clean):
                hs = model.model.layers[layer].output[:, -1, :]
                barrier()
            with tracer.invoke(corrupt):
                barrier()
                model.model.layers[layer].output[:, -1, :] = hs
                logits = model.lm_head.output[:, -1, :].save()
        results[layer] = logits.softmax(-1)[0, paris].item()
    return {"results": [results[k] for k in sorted(results)]}


@pattern("docs/patterns/activation-patching.md: patching the MLP output")
def activation_patching_mlp(nnsight, model):
    clean = "The Eiffel Tower is in the city of"
    corrupt = "The Colosseum is in the city of"
    LAYER = 7
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            clean_mlp = model.model.layers[LAYER].mlp.output[:, -1, :]
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            model.model.layers[LAYER].mlp.output[:, -1, :] = clean_mlp
            patched = model.lm_head.output[:, -1, :].save()
    return {"patched": patched}


@pattern("docs/patterns/per-head-attention.md: one head's output (shapes while recording)")
def per_head_read(nnsight, model):
    n_heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // n_heads
    LAYER = 5
    HEAD = 4
    prompt = "The cat sat on the"
    with model.trace(prompt):
        attn_out = model.model.layers[LAYER].self_attn.output[0]
        B, S, H = attn_out.shape
        per_head = attn_out.view(B, S, n_heads, head_dim).save()
    return {"per_head": per_head, "head": per_head[:, :, HEAD]}


# -- errors, foreign code, features farscope lacks ---------------------------------------------------


@pattern("docs/gotchas: an out-of-range index raises IndexError")
def error_index(nnsight, model):
    try:
        with model.trace("Hello"):
            bad = model.lm_head.output[0, 1000].save()
        caught = None
    except IndexError:
        caught = "IndexError"
    return {"caught": caught}


@pattern("docs/usage/save.md: saved token ids through the tokenizer and numpy")
def saved_values_are_tensors(nnsight, model):
    with model.trace("The Eiffel Tower is in the city of"):
        hidden = model.model.layers[5].output.save()
        token = model.lm_head.output[0, -1].argmax(dim=-1).save()
    return {"decoded": model.tokenizer.decode(token), "is_tensor": isinstance(token, torch.Tensor),
            "numpy_sum": float(hidden.detach().numpy().astype("float64").sum()), "token": token}


@pattern("docs/usage/source.md: an operation inside a module's forward")
def source_operation(nnsight, model):
    with model.trace("Hello"):
        attn = model.model.layers[0].self_attn.source.self_o_proj_0.output.save()
    return {"attn": attn}


@pattern("docs/usage/scan.md: shapes without running the model")
def scan_shapes(nnsight, model):
    with model.scan("Hello"):
        dim = nnsight.save(model.model.layers[0].output.shape[-1])
    return {"dim": dim}
