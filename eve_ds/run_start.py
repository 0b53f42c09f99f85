"""Where a pre-training run starts from, checked before it trains: the checkpoint it resumes (its model, objectives
and --train-only selection must be this run's) or the consolidated weights of --init-from."""
import logging

from eve_ds.checkpoint.pretrained import CheckpointError, load_weights, open_pretrained, pretrained_config
from eve_ds.config import ConfigError, EVEConfig
from eve_ds.model.moe import ExpertPlacement
from eve_ds.objectives import DEFAULT_OBJECTIVES, PretrainingModel, describe_objectives

logger = logging.getLogger("eve_ds.pretrain")


def resumed_settings(config: EVEConfig, objectives: dict, train_only: list, tokenizer, saved: EVEConfig, held,
                     saved_state: dict, source) -> tuple:
    """(config, objectives) of a run resumed from ``source``, whose model config is ``saved``, whose heads ``held``
    (a HeldModel) and whose client state ``saved_state``; a ConfigError in one sentence where the checkpoint cannot
    go on as this run asks."""
    tokenizer.check_fits(saved.vocab_size, source)
    config = resumed_config(config, saved, source)
    objectives = resumed_objectives(objectives, held, source)
    saved_train_only = saved_state.get("train_only", [])
    if saved_train_only != train_only:
        raise ConfigError(f"{source} was trained with --train-only {','.join(saved_train_only) or '(all)'}; resume "
                          f"with the same selection (this run asks for {','.join(train_only) or 'all'})")
    return config, objectives


def resumed_config(requested: EVEConfig, saved: EVEConfig, source) -> EVEConfig:
    """A resumed run goes on computing the function its checkpoint was trained as: where the checkpoint says
    otherwise about the routing embedding (those written before that setting existed are router-only), the
    checkpoint wins. Any other difference is an error that names the keys."""
    # How the positions were initialised does not change what the saved weights compute: the checkpoint's is kept.
    requested = requested.replace(position_init=saved.position_init)
    if saved.routing_embedding_to_experts != requested.routing_embedding_to_experts:
        logger.warning("%s was trained with routing_embedding_to_experts %s; the resumed run keeps that",
                       source, saved.routing_embedding_to_experts)
        requested = requested.replace(routing_embedding_to_experts=saved.routing_embedding_to_experts)
    if saved != requested:
        raise ConfigError(f"{source} was written for another model configuration: {requested.differences_said(saved)}")
    return requested


def resumed_objectives(requested: dict, held, source) -> dict:
    """The objectives of a resumed run: the checkpoint's heads must be those the requested objectives need (a run
    saved before objectives existed trained msm); their weights may change."""
    saved = held.head_options.get("objectives") or DEFAULT_OBJECTIVES
    if set(saved) != set(requested):
        raise ConfigError(f"{source} was trained with --objectives {describe_objectives(saved)}, whose heads this run's "
                          f"{describe_objectives(requested)} would not match: resume with --objectives "
                          f"{describe_objectives(saved)}")
    if saved != requested:
        logger.warning("%s was trained with --objectives %s; the resumed run weighs them %s", source,
                       describe_objectives(saved), describe_objectives(requested))
    return requested


def check_init_from(path, config: EVEConfig):
    """ConfigError unless the folder ``path`` holds a model of ``config`` (how its positions started aside, which does
    not change what it computes)."""
    initial = pretrained_config(path).replace(position_init=config.position_init)
    differences = config.differences_said(initial)
    if differences:
        raise ConfigError(f"--init-from {path} holds another model configuration: {differences}")


def initialise_from(model: PretrainingModel, placement: ExpertPlacement, path):
    """The encoder of a consolidated folder, and the heads of ``model`` that it holds (the others keep their
    initialisation); CheckpointError where the folder lacks an encoder weight."""
    weights, _ = open_pretrained(path)
    names = placement.global_names(model)
    missing = [name for name in names.values() if name.startswith("encoder.") and name not in weights]
    if missing:
        raise CheckpointError(f"--init-from {path} holds no {missing[0]} ({len(missing)} encoder weights missing)")
    load_weights(model, weights.renamed(names), path, names={name for name, stored in names.items()
                                                               if stored in weights})
    heads = sorted({name.split(".")[0] for name in names.values() if not name.startswith("encoder.")})
    stored_heads = {name.split(".")[0] for name in weights}
    fresh = [head for head in heads if head not in stored_heads]
    logger.info("initialised from %s: the encoder%s%s", path,
                f", {', '.join(head for head in heads if head not in fresh)}" if len(fresh) < len(heads) else "",
                f"; new {', '.join(fresh)}" if fresh else "")
