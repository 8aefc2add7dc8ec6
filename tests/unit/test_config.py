"""agent.toml and client.toml: good files load, bad ones fail with the file and field named."""

import pytest

from discovery.agent_config import load_agent_config
from discovery.cli.config import load_client_config
from discovery.scheduler.settings import DvmsSettings
from discovery.toml_config import ConfigError

GOOD = """
name = "node1"
site = "rennes"
listen = "127.0.0.1:7001"
join = ["127.0.0.1:7002"]
data_dir = "data"
[capacity]
vcpus = 8
memory_mb = 16384
disk_gb = 100
[tls]
ca = "ca.pem"
cert = "node1.pem"
key = "node1.key"
[latency.rtt_ms]
rennes = { lyon = 12 }
"""


def write(tmp_path, text, name="agent.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_agent_config_resolves_relative_paths(tmp_path):
    cfg = load_agent_config(write(tmp_path, GOOD))
    assert (cfg.name, cfg.site, cfg.listen, cfg.join) == ("node1", "rennes", "127.0.0.1:7001", ["127.0.0.1:7002"])
    assert cfg.data_dir == tmp_path / "data" and cfg.identity.cert == tmp_path / "node1.pem"
    assert cfg.capacity.vcpus == 8 and cfg.site_rtt_ms == {"rennes": {"lyon": 12.0}}


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.replace('name = "node1"\n', ""), "missing field 'name'"),
    (lambda t: t.replace("vcpus = 8", 'vcpus = "eight"'), "field 'capacity.vcpus' must be int"),
    (lambda t: t.replace("vcpus = 8", "vcpus = true"), "field 'capacity.vcpus' must be int"),
    (lambda t: t.replace("vcpus = 8", "vcpus = 0"), "at least 1 vCPU"),
    (lambda t: t.replace('listen = "127.0.0.1:7001"', 'listen = "nowhere"'), "field 'listen': bad address"),
    (lambda t: t.replace('join = ["127.0.0.1:7002"]', "join = [7002]"), "field 'join': expected a host:port"),
    (lambda t: t.replace('key = "node1.key"\n', ""), "missing field 'tls.key'"),
    (lambda t: t.replace("rennes = { lyon = 12 }", 'rennes = { lyon = "far" }'), "latency.rtt_ms must map"),
    (lambda t: t + "[[[", "not valid TOML"),
    (lambda t: t.replace("127.0.0.1:7001", "0.0.0.0:7001"), "binds every address: set advertise"),
    (lambda t: t.replace('site = "rennes"', 'site = "rennes"\nadvertise = "10.0.0.5:7001"'), "no port, no wildcard"),
    (lambda t: t.replace('site = "rennes"', 'site = "rennes"\nadvertise = "0.0.0.0"'), "no port, no wildcard"),
    (lambda t: t.replace('data_dir = "data"', 'data_dir = "data"\nmetrics = "9464"'), "'metrics' must be host:port"),
])
def test_bad_agent_config_names_the_field(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_agent_config(write(tmp_path, change(GOOD)))
    assert str(err.value).startswith(str(tmp_path / "agent.toml")) and "\n" not in str(err.value)


def test_a_node_is_reached_at_its_advertised_host_else_at_its_listen_address(tmp_path):
    assert load_agent_config(write(tmp_path, GOOD)).host == "127.0.0.1"
    wildcard = GOOD.replace("127.0.0.1:7001", "0.0.0.0:7001").replace('site = "rennes"',
                                                                      'site = "rennes"\nadvertise = "10.0.0.5"')
    assert load_agent_config(write(tmp_path, wildcard)).host == "10.0.0.5"


def test_migrations_go_to_the_target_daemon_s_host():
    from agents.host.moves import migrate_params
    from overlay.wire.rpc import RequestError

    (uri,) = migrate_params("qemu+tcp://10.7.0.3:16509/system").values()
    assert uri == "tcp://10.7.0.3"
    assert list(migrate_params("qemu+tcp://[fd00::3]:16509/system").values()) == ["tcp://[fd00::3]"]
    with pytest.raises(RequestError, match="names no host"):
        migrate_params("qemu:///system")


@pytest.mark.parametrize("uri", ["qemu+tcp://10.7.0.3/system", "qemu+tls://h1/system", "qemu+ssh://root@h1/system"])
def test_a_migration_goes_to_a_daemon_over_tcp_tls_or_ssh(uri):
    from agents.messages import Migrate
    from overlay.wire.rpc import RequestError

    assert Migrate("ve:vm", uri).uri == uri
    with pytest.raises(RequestError, match="uri must be the target's libvirt URI"):
        Migrate("ve:vm", uri.replace("qemu+", "http+"))


@pytest.mark.parametrize(("line", "metrics"), [("", "127.0.0.1:0"), ('metrics = "0.0.0.0:9464"', "0.0.0.0:9464"),
                                              ('metrics = "[::1]:0"', "[::1]:0"), ('metrics = ""', "")])
def test_the_metrics_endpoint_is_on_loopback_unless_told(tmp_path, line, metrics):
    assert load_agent_config(write(tmp_path, GOOD.replace('data_dir = "data"', f'data_dir = "data"\n{line}'))).metrics \
        == metrics


def test_missing_client_config_says_how_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match="discovery cluster up"):
        load_client_config(str(tmp_path / "nope.toml"))


def test_client_config_resolves_node_names_and_addresses(tmp_path):
    path = write(tmp_path, 'agent = "127.0.0.1:1"\n[nodes]\nnode2 = "127.0.0.1:2"\n'
                           '[tls]\nca = "ca.pem"\ncert = "op.pem"\nkey = "op.key"\n', "client.toml")
    client = load_client_config(str(path))
    assert client.resolve(None) == "127.0.0.1:1"
    assert client.resolve("node2") == "127.0.0.1:2"
    assert client.resolve("10.0.0.9:7000") == "10.0.0.9:7000"
    with pytest.raises(ConfigError, match="unknown agent 'node9'.*node2"):
        client.resolve("node9")


def test_an_agent_config_works_as_a_client_config(tmp_path):
    client = load_client_config(str(write(tmp_path, GOOD)))
    assert client.resolve(None) == "127.0.0.1:7001"


def test_hypervisor_and_migration_ports_are_checked(tmp_path):
    cfg = load_agent_config(write(tmp_path, 'hypervisor = "qemu"\nlibvirtd_port = 16600\n'
                                            'migration_ports = [49200, 49215]\n' + GOOD))
    assert (cfg.hypervisor, cfg.libvirtd_port, cfg.migration_ports) == ("qemu", 16600, (49200, 49215))
    assert load_agent_config(write(tmp_path, GOOD)).hypervisor == "test"
    with pytest.raises(ConfigError, match="'hypervisor' must be"):
        load_agent_config(write(tmp_path, 'hypervisor = "xen"\n' + GOOD))
    with pytest.raises(ConfigError, match="'migration_ports' must be"):
        load_agent_config(write(tmp_path, 'migration_ports = [49215, 49200]\n' + GOOD))


def test_a_system_daemon_s_migration_uri_names_its_host(tmp_path):
    system = 'hypervisor = "qemu"\nlibvirt_uri = "qemu:///system"\n'
    cfg = load_agent_config(write(tmp_path, system + 'migration_uri = "qemu+tls://h1.example/system"\n' + GOOD))
    assert (cfg.libvirt_uri, cfg.migration_uri) == ("qemu:///system", "qemu+tls://h1.example/system")
    assert load_agent_config(write(tmp_path, system + GOOD)).migration_uri == ""  # qemu+tcp://HOST/system
    for bad in ("qemu:///system", "http://h1/system", "qemu+tcp:///system"):
        with pytest.raises(ConfigError, match="'migration_uri' goes with"):
            load_agent_config(write(tmp_path, system + f'migration_uri = "{bad}"\n' + GOOD))
    with pytest.raises(ConfigError, match="'migration_uri' goes with"):  # a node's own daemon has its own URI
        load_agent_config(write(tmp_path, 'hypervisor = "qemu"\nmigration_uri = "qemu+tcp://h1/system"\n' + GOOD))


def test_dvms_table_defaults_and_values(tmp_path):
    assert load_agent_config(write(tmp_path, GOOD)).extra["dvms"] == DvmsSettings()
    assert DvmsSettings().injector_rate == 0 and DvmsSettings().underload == 0  # nothing moves unless asked
    cfg = load_agent_config(write(tmp_path, GOOD + "[dvms]\ninjector_rate = 0.05\nseed = 7\nunderload = 0.2\n"
                                                   "overload_clear = 0.8\n"))
    dvms = cfg.extra["dvms"]
    assert (dvms.injector_rate, dvms.seed, dvms.underload, dvms.overload_clear) == (0.05, 7, 0.2, 0.8)
    assert dvms.thresholds().underload == 0.2 and dvms.thresholds().overload_clear == 0.8


@pytest.mark.parametrize(("table", "message"), [
    ("injector_rate = -1", "field 'dvms.injector_rate' must be >= 0"),
    ("injector_rate = \"fast\"", "field 'dvms.injector_rate' must be a number"),
    ("injector_rate = inf", "field 'dvms.injector_rate' must be a number"),
    ("seed = 1.5", "field 'dvms.seed' must be an integer"),
    ("injector_std = 0", "field 'dvms.injector_std' must be > 0"),
    ("overload_clear = 1.2", "field 'dvms.overload_clear' must be in"),
    ("underload = 0.5", "field 'dvms.underload' must be in"),
    ("underload_clear = 0.95", "field 'dvms.underload_clear' must be <="),
    ("retry = 0", "field 'dvms.retry' must be > 0"),
    ("overlod = 1.1", "unknown field 'dvms.overlod'"),
])
def test_bad_dvms_table_names_the_field(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_agent_config(write(tmp_path, GOOD + "[dvms]\n" + table + "\n"))
    assert "\n" not in str(err.value)


def test_the_injector_is_for_the_test_driver_only(tmp_path):
    with pytest.raises(ConfigError, match="dvms.injector_rate' needs hypervisor"):
        load_agent_config(write(tmp_path, 'hypervisor = "qemu"\n' + GOOD + "[dvms]\ninjector_rate = 0.1\n"))
