"""Messages from the retraining flow: Prefect automations that send them through a notification block.

`python -m flows.deploy` makes (or remakes) two automations on the Prefect server when
`retrain.notify` names a notification block:

- `llm-forge: retraining failed`: a run of the retraining flow ended Failed or Crashed (a stage
  failed, the params file is bad, another pipeline run holds the project, the worker died); the
  message names the run, its state and the state's message (the error).
- `llm-forge: champion moved`: the gate promoted a candidate. The flow emits the event
  `llm-forge.champion.promoted` (`announce`) with the decision's reason and its figures (the gate's
  table: each metric's values, improvement, interval and threshold), which the message carries.
  A candidate the gate refused emits `llm-forge.champion.kept`, which no automation listens to:
  a team that wants those messages too adds one in the Prefect UI (Automations).

The block is any of Prefect's notification blocks, made once on the server (the UI's Blocks page,
or Python): Slack webhook, Microsoft Teams, e-mail (`prefect-email`), or a custom webhook that
posts to any URL. `retrain.notify` names it as `<block type>/<block name>`, e.g.
`slack-webhook/llm-forge`; the webhook's URL (a secret) stays in the block, never in the project.
Both automations match the retraining flow by name, so they fire for a run started by a worker,
by `make serve` or by hand, on whichever server they were made on.
"""

from __future__ import annotations

from typing import Any

PROMOTED, KEPT = "llm-forge.champion.promoted", "llm-forge.champion.kept"
FAILED = "llm-forge: retraining failed"
MOVED = "llm-forge: champion moved"

FAILED_SUBJECT = "llm-forge: retraining run {{ flow_run.name }} {{ flow_run.state.name }}"
FAILED_BODY = """\
The retraining run {{ flow_run.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}
Deployment: {{ deployment.name }}. {{ flow_run|ui_url }}"""
MOVED_SUBJECT = "llm-forge: {{ event.payload.model }} version {{ event.payload.candidate }} is champion"
MOVED_BODY = """\
The retraining run {{ flow_run.name }} promoted {{ event.payload.model }} version {{ event.payload.candidate }} \
to champion (it was version {{ event.payload.champion_before }}; that one is now previous-champion).
{{ event.payload.reason }}

{{ event.payload.figures }}
{{ flow_run|ui_url }}"""


def announce(result: dict[str, Any], figures: str) -> None:
    """Emit the gate's decision as a Prefect event (inside a flow run, Prefect relates it to the
    run, its flow and its deployment): `PROMOTED` when `champion` moved, else `KEPT`. `result` is
    the flow's gate record (model, versions, decision); `figures` the decision's table."""
    from prefect.events import emit_event

    decision = result["decision"]
    emit_event(event=PROMOTED if decision["promote"] else KEPT,
               resource={"prefect.resource.id": f"mlflow.registered-model.{result['model']}",
                         "prefect.resource.name": result["model"]},
               payload={"model": result["model"], "candidate": result["candidate"],
                        "champion_before": result["champion_before"], "champion_after": result["champion_after"],
                        "reason": decision["reason"], "figures": figures})


def automations(block_document_id: Any, flow_name: str) -> list[Any]:
    """The two automations about the flow `flow_name`, sending through the block document
    `block_document_id`."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification

    flow = {"prefect.resource.role": "flow", "prefect.resource.name": flow_name}
    failed = Automation(
        name=FAILED, description="A run of the retraining flow failed or crashed: say so, with its error.",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=flow,
                             posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(block_document_id=block_document_id, subject=FAILED_SUBJECT, body=FAILED_BODY)])
    moved = Automation(
        name=MOVED, description="The champion gate promoted a candidate: say which, why and by how much.",
        trigger=EventTrigger(expect={PROMOTED}, match_related=flow, posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(block_document_id=block_document_id, subject=MOVED_SUBJECT, body=MOVED_BODY)])
    return [failed, moved]


def install(block: str, flow_name: str) -> list[str]:
    """Make the automations about the flow `flow_name` on the current Prefect server, sending
    through the notification block `block` (`<type>/<name>`); an automation of the same name is replaced. Returns their
    names. A ValueError names a block that is not there or cannot send messages."""
    from prefect.automations import Automation
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import NotificationBlock

    try:
        found = Block.load(block)
    except (ValueError, KeyError) as err:
        raise ValueError(f"retrain.notify: no notification block '{block}' on the Prefect server ({err}); "
                         "make it in the UI's Blocks page, or set retrain.notify to null") from None
    if not isinstance(found, NotificationBlock):
        raise ValueError(f"retrain.notify: the block '{block}' is a {type(found).__name__}, which sends no messages")
    made = []
    for automation in automations(found._block_document_id, flow_name):
        while True:  # a rerun replaces what an earlier one made
            try:
                Automation.read(name=automation.name).delete()
            except ValueError:  # none (left)
                break
        made.append(automation.create().name)
    return made
