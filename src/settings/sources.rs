//! `[kubernetes]` and `[sources]`: the second source of peers, and how it
//! combines with etcd.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Settings, SettingsError, invalid};
use crate::store::{SourceKind, SourcePolicy};

/// Where the service account's files are inside a pod.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The Kubernetes source, on when `[kubernetes]` is present.
#[derive(Debug, Clone, PartialEq)]
pub struct Kubernetes {
    /// `https://host:port`.
    pub apiserver: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub namespaces: Vec<String>,
    pub port_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileKubernetes {
    apiserver: Option<String>,
    token_file: Option<String>,
    ca_file: Option<String>,
    namespaces: Option<Vec<String>>,
    port_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSources {
    first: Option<String>,
    merge: Option<bool>,
}

/// The apiserver a pod reaches, from the variables Kubernetes sets in it.
fn in_cluster() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .filter(|h| !h.is_empty())?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Some(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// A namespace name (an RFC 1123 label).
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(super) fn apply_kubernetes(
    s: &mut Settings,
    k: FileKubernetes,
    o: &dyn Fn(&str) -> String,
) -> Result<(), SettingsError> {
    let apiserver = match k.apiserver.or_else(in_cluster) {
        Some(a) if a.starts_with("https://") && a.len() > "https://".len() => {
            a.trim_end_matches('/').to_string()
        }
        Some(a) => {
            return Err(invalid(
                &o("kubernetes.apiserver"),
                format!("'{a}' is not an https:// URL"),
            ));
        }
        None => {
            return Err(invalid(
                &o("kubernetes.apiserver"),
                "not set, and not in a cluster (KUBERNETES_SERVICE_HOST is unset)",
            ));
        }
    };
    let namespaces = k.namespaces.unwrap_or_else(|| vec!["default".into()]);
    if namespaces.is_empty() {
        return Err(invalid(&o("kubernetes.namespaces"), "names no namespace"));
    }
    if let Some(bad) = namespaces.iter().find(|n| !is_label(n)) {
        return Err(invalid(
            &o("kubernetes.namespaces"),
            format!("'{bad}' is not a namespace name"),
        ));
    }
    let port_name = k.port_name.unwrap_or_else(|| "http".into());
    if port_name.is_empty() {
        return Err(invalid(&o("kubernetes.port_name"), "is empty"));
    }
    s.kubernetes = Some(Kubernetes {
        apiserver,
        token_file: k.token_file.map_or_else(
            || PathBuf::from(SERVICE_ACCOUNT).join("token"),
            PathBuf::from,
        ),
        ca_file: k.ca_file.map_or_else(
            || PathBuf::from(SERVICE_ACCOUNT).join("ca.crt"),
            PathBuf::from,
        ),
        namespaces,
        port_name,
    });
    Ok(())
}

pub(super) fn apply_sources(
    s: &mut Settings,
    f: FileSources,
    o: &dyn Fn(&str) -> String,
) -> Result<(), SettingsError> {
    if let Some(first) = f.first {
        s.sources.first = match first.as_str() {
            "etcd" => SourceKind::Etcd,
            "kubernetes" => SourceKind::Kubernetes,
            _ => {
                return Err(invalid(
                    &o("sources.first"),
                    format!("'{first}' is neither \"etcd\" nor \"kubernetes\""),
                ));
            }
        };
    }
    if let Some(m) = f.merge {
        s.sources.merge = m;
    }
    Ok(())
}

/// The `--check` lines.
pub(super) fn describe(
    k: Option<&Kubernetes>,
    p: &SourcePolicy,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    match k {
        Some(k) => {
            writeln!(f, "kubernetes.apiserver = {}", k.apiserver)?;
            writeln!(f, "kubernetes.token_file = {}", k.token_file.display())?;
            writeln!(f, "kubernetes.ca_file = {}", k.ca_file.display())?;
            writeln!(f, "kubernetes.namespaces = {}", k.namespaces.join(","))?;
            writeln!(f, "kubernetes.port_name = {}", k.port_name)?;
        }
        None => writeln!(f, "kubernetes = off")?,
    }
    let first = match p.first {
        SourceKind::Etcd => "etcd",
        SourceKind::Kubernetes => "kubernetes",
    };
    writeln!(f, "sources.first = {first}")?;
    writeln!(f, "sources.merge = {}", p.merge)
}
