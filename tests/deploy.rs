//! The manifests in `deploy/`: they parse (Debian's PyYAML, which
//! `scripts/test` installs), the Role grants list and watch on
//! endpointslices and nothing more, the DaemonSet runs as the bound
//! service account with the ConfigMap's file, as the image's user with
//! the image's health check, and that file passes
//! `elb --check` with the in-cluster variables a pod has.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use common::{TempDir, run_elb};

/// Debian's interpreter, which has PyYAML whatever else is on PATH.
const PYTHON: &str = "/usr/bin/python3";

/// Every document of every manifest, as JSON.
fn documents() -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut docs = Vec::new();
    for f in files {
        let out = Command::new(PYTHON)
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            ])
            .arg(&f)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{} does not parse: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
        docs.extend(parsed);
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn the_manifests_grant_only_what_the_source_needs_and_their_config_checks() {
    let docs = documents();
    for d in &docs {
        assert!(
            d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
            "{d}"
        );
    }
    let roles = of_kind(&docs, "Role");
    assert_eq!(roles.len(), 1);
    assert_eq!(
        roles[0]["rules"],
        json!([{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}])
    );
    assert!(
        of_kind(&docs, "ClusterRole").is_empty(),
        "no cluster-wide grant"
    );
    let account = of_kind(&docs, "ServiceAccount")[0]["metadata"]["name"].clone();
    let binding = of_kind(&docs, "RoleBinding")[0];
    assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], account);

    let ds = of_kind(&docs, "DaemonSet")[0];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account);
    assert_eq!(pod["hostNetwork"], true);
    let cm = of_kind(&docs, "ConfigMap")[0];
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        cm["metadata"]["name"]
    );
    let args = pod["containers"][0]["args"].to_string();
    let mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap_or_default();
    assert!(args.contains(&format!("{mount}/elb.toml")), "{args}");
    // The image's user, and its health check with the same file.
    let container = &pod["containers"][0];
    let dockerfile =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .expect("Dockerfile");
    let uid = container["securityContext"]["runAsUser"].to_string();
    assert!(
        dockerfile.contains(&format!("--uid {uid} ")),
        "runAsUser {uid} is not the Dockerfile's user"
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["add"],
        json!(["NET_BIND_SERVICE"])
    );
    assert_eq!(
        container["livenessProbe"]["exec"]["command"],
        json!([
            "/usr/local/bin/elb",
            "--config",
            format!("{mount}/elb.toml"),
            "--probe"
        ])
    );

    // The ConfigMap's file, as a pod would read it.
    let dir = TempDir::new("deploy");
    let toml = cm["data"]["elb.toml"]
        .as_str()
        .expect("elb.toml in the ConfigMap");
    let file = dir.write("elb.toml", toml);
    let checked = run_elb(
        &["--check", "--config", &file.to_string_lossy()],
        &[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(checked.code(), Some(0), "{:?}", checked.stderr_lines());
    assert!(
        checked
            .stdout
            .contains("kubernetes.apiserver = https://10.96.0.1:443"),
        "{}",
        checked.stdout
    );
    assert!(
        checked.stdout.contains(
            "kubernetes.token_file = /var/run/secrets/kubernetes.io/serviceaccount/token"
        ),
        "{}",
        checked.stdout
    );
}
