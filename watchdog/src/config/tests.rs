use super::*;

fn error(text: &str) -> ConfigError {
    parse(Path::new("/etc/watchdog/test.toml"), text).expect_err("accepted")
}

/// Each kind of bad file has its own message, at the right line and
/// column, naming the key.
#[test]
fn bad_files_are_located_and_explained() {
    let cases: &[(&str, usize, usize, &str, &str)] = &[
        (
            "[[service]]\nname = \"a\"\ncommand = [\"/bin/true\"]\nmax-rs = \"1GiB\"\n",
            4,
            1,
            "service[0].max-rs",
            "unknown field `max-rs`",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nmax-rss = \"12XB\"\n",
            3,
            11,
            "service[0].max-rss",
            "invalid size \"12XB\"",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\ngrace = \"ten seconds\"\n",
            3,
            9,
            "service[0].grace",
            "invalid duration \"ten seconds\"",
        ),
        (
            "[daemon]\nstate-dir = \"/tmp\"\n\n[[service]]\nname = \"x\"\n",
            4,
            1,
            "service[0]",
            "missing field `command`",
        ),
        (
            "[[service]]\nname = \"w\"\ncommand = [\"/bin/true\"]\n\n[[service]]\nname = \"w\"\ncommand = [\"/bin/false\"]\n",
            6,
            1,
            "service[1].name",
            "already used by service[0]",
        ),
        (
            "[[watch]]\nname = \"s\"\nlimit = \"1GiB\"\n",
            1,
            1,
            "watch[0]",
            "needs exactly one of pid, match or ancestor-match",
        ),
        (
            "[[watch]]\nname = \"s\"\nmatch = \"x\"\nlimit = \"0\"\n",
            4,
            1,
            "watch[0].limit",
            "limit must be more than 0",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nmax-rss = \"0\"\n",
            3,
            1,
            "service[0].max-rss",
            "max-rss must be more than 0",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nmax-rss = 5\n",
            3,
            11,
            "service[0].max-rss",
            "expected a size in quotes",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\ngrace = \"18446744073709551615s\"\n",
            3,
            9,
            "service[0].grace",
            "too long",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nsuccess-exit-codes = [0, 300]\n",
            3,
            1,
            "service[0].success-exit-codes",
            "0 to 255",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\ngroup = \"nogroup\"\n",
            3,
            1,
            "service[0].group",
            "needs user",
        ),
        (
            "[[service]]\ncommand = [\"/nonexistent/program\"]\n",
            2,
            1,
            "service[0].command",
            "no such program",
        ),
        (
            "[daemon]\nsensor = \"magic\"\n",
            2,
            10,
            "daemon.sensor",
            "unknown variant `magic`",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nname = \"a b\"\n",
            3,
            1,
            "service[0].name",
            "use letters, digits",
        ),
        (
            "[[watch]]\nname = \"s\"\nmatch = \"(\"\nlimit = \"1GiB\"\n",
            3,
            1,
            "watch[0].match",
            "invalid regular expression",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nmax-rss = \"1GiB\"\nhard-limit = \"512MiB\"\n",
            4,
            1,
            "service[0].hard-limit",
            "under max-rss",
        ),
        ("[[service]\n", 1, 11, "", "unclosed array table"),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nmax-rss = \"5\"\n",
            3,
            11,
            "service[0].max-rss",
            "has no unit",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nsuccess-exit-codes = []\n",
            3,
            22,
            "service[0].success-exit-codes",
            "the list is empty",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nstop-signal = \"SIGCHLD\"\n",
            3,
            1,
            "service[0].stop-signal",
            "ignored by default",
        ),
    ];
    for &(text, line, column, key, needle) in cases {
        let err = error(text);
        assert!(
            err.message.contains(needle),
            "{text:?}: {:?} does not say {needle:?}",
            err.message
        );
        assert_eq!(
            (err.line, err.column, err.key.as_str()),
            (line, column, key),
            "{text:?}: {err}"
        );
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("/etc/watchdog/test.toml:{line}:{column}")),
            "{shown}"
        );
    }
}

#[test]
fn the_sample_is_accepted() {
    let config = parse(Path::new("sample.toml"), SAMPLE).expect("the sample is valid");
    assert_eq!(config.services.len(), 2);
    assert_eq!(config.services[0].name, "web");
    assert!(config.services[1].is_watch());
    assert_eq!(config.daemon.state_dir, Path::new(DEFAULT_STATE_DIR));
}

#[test]
fn defaults_are_filled_in() {
    let config = parse(
        Path::new("x.toml"),
        "[[service]]\ncommand = [\"/usr/bin/env\", \"sleep\", \"1\"]\nmax-rss = \"1GiB\"\n\
         [[watch]]\nname = \"s\"\npid = 1\nlimit = \"2GiB\"\n",
    )
    .unwrap();
    let service = &config.services[0];
    assert_eq!(service.name, "env");
    assert_eq!(service.policy.max_crashes, 5);
    assert_eq!(service.policy.shutdown_grace, Duration::from_secs(10));
    let watch = &config.services[1];
    let marker = watch.marker.as_ref().unwrap();
    assert_eq!(
        marker.path,
        Path::new("/run/watchdog/respawn-recommended/s")
    );
    assert_eq!(config.daemon.orphans, Orphans::Terminate);
}

#[test]
fn a_missing_file_says_how_to_make_one() {
    let err = load(Path::new("/nonexistent/watchdog.toml")).unwrap_err();
    assert!(err.to_string().contains("--sample-config"), "{err}");
}

/// The HTTP listener stays on loopback unless told otherwise; its address
/// and the memory monitor's levels are checked with their key named.
#[test]
fn listener_and_memory_monitor_settings_are_checked() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[daemon]\nlisten = \"0.0.0.0:9731\"\n",
            "daemon.listen",
            "can be reached from other hosts",
        ),
        (
            "[daemon]\nlisten = \"[::]:9731\"\n",
            "daemon.listen",
            "allow-remote = true",
        ),
        (
            "[daemon]\nlisten = \"localhost:9731\"\n",
            "daemon.listen",
            "write an IP address and a port",
        ),
        (
            "[daemon]\nlisten = \"127.0.0.1\"\n",
            "daemon.listen",
            "write an IP address and a port",
        ),
        (
            "[daemon]\nlisten = \"127.0.0.1:0\"\n",
            "daemon.listen",
            "has no port",
        ),
        (
            "[daemon]\nhealth-timeout = \"0s\"\n",
            "daemon.health-timeout",
            "must be more than 0",
        ),
        (
            "[daemon]\nhealth-timeout = \"2s\"\n",
            "daemon.health-timeout",
            "must be at least 3s",
        ),
        (
            "[daemon]\nhost-memory-interval = \"10ms\"\n",
            "daemon.host-memory-interval",
            "must be at least 100ms",
        ),
        (
            "[daemon]\nhost-memory-warn = \"1B\"\n",
            "daemon.host-memory-warn",
            "at least 1MiB",
        ),
        (
            "[daemon]\nstate-dir = \"/tmp/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n",
            "daemon.state-dir",
            "use a shorter state-dir",
        ),
        (
            "[daemon]\nhost-memory-warn = \"120%\"\n",
            "daemon.host-memory-warn",
            "at most 100",
        ),
        (
            "[daemon]\nhost-memory-warn = \"80%\"\nhost-memory-recover = \"85%\"\n",
            "daemon.host-memory-recover",
            "must be under host-memory-warn (80%)",
        ),
        (
            "[daemon]\nhost-memory-warn = \"8GiB\"\nhost-memory-recover = \"85%\"\n",
            "daemon.host-memory-recover",
            "both shares",
        ),
        (
            "[daemon]\nhost-memory-warn = \"lots\"\n",
            "daemon.host-memory-warn",
            "\"90%\"",
        ),
    ];
    for (text, key, message) in cases {
        let e = error(text);
        assert_eq!(&e.key, key, "{text}: {e}");
        assert!(e.to_string().contains(message), "{text}: {e}");
        assert!(e.line > 0, "{text}: {e}");
    }
    let ok = |text: &str| parse(Path::new("t.toml"), text).expect("refused").daemon;
    let d = ok("[daemon]\nlisten = \"0.0.0.0:9731\"\nallow-remote = true\n");
    assert_eq!(d.listen, Some("0.0.0.0:9731".parse().unwrap()));
    let d = ok("[daemon]\nlisten = \"[::1]:9731\"\nhost-memory-warn = \"12GiB\"\n");
    assert_eq!(d.host_memory_warn, Threshold::Bytes(12 << 30));
    assert_eq!(
        d.host_memory_recover,
        Some(Threshold::Bytes((12u64 << 30) / 20 * 19))
    );
    let d = ok("[daemon]\nlisten = \"[::ffff:127.0.0.1]:9731\"\n");
    assert!(d.listen.is_some());
    let d = ok("");
    assert_eq!(d.listen, None);
    assert_eq!(d.health_timeout, Duration::from_secs(30));
    assert_eq!(d.host_memory_recover, Some(Threshold::Percent(85.0)));
}
