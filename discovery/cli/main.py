"""The `discovery` command: the root app with every command group attached.

Each group lives in its own module; none loads agent code at import (commands import what they run
when they run), so `discovery --help` and client commands start fast.
"""

from __future__ import annotations

from discovery.cli import agent, ca, campaign, cluster, dvms, ha, image, overlays, sim, testbed, top, ve
from discovery.cli.app import app

app.add_typer(agent.agent_app, name="agent")
app.add_typer(ca.ca_app, name="ca")
app.add_typer(ve.ve_app, name="ve")
app.add_typer(image.image_app, name="image")
app.add_typer(cluster.cluster_app, name="cluster")
app.add_typer(sim.sim_app, name="sim")
app.add_typer(overlays.overlay_app, name="overlay")
app.add_typer(overlays.kv_app, name="kv")
app.add_typer(dvms.dvms_app, name="dvms")
app.add_typer(ha.ha_app, name="ha")
app.add_typer(testbed.testbed_app, name="testbed")
app.add_typer(campaign.campaign_app, name="campaign")
app.command("top")(top.top)


def main() -> None:
    app()
