//! Bad input and failures: each gives a clear error of the right kind, and the worker stays up.

mod support;

use std::collections::BTreeMap;

use granary_cache::client::{ClientError, WorkerPool};
use granary_cache::worker::{self, StartError, WorkerConfig};
use support::*;

#[tokio::test]
async fn an_unknown_scheme_or_missing_credentials_fail_at_start() {
    let config = WorkerConfig::new("ftp://host/data", "127.0.0.1:0".parse().unwrap());
    let err = worker::start(config).await.err().expect("refused");
    assert!(matches!(err, StartError::Source(_)));
    assert!(err.to_string().contains("unknown source scheme \"ftp\""), "{err}");

    if std::env::var("AWS_ACCESS_KEY_ID").is_err() && std::env::var("AWS_PROFILE").is_err() {
        let mut config = WorkerConfig::new("s3://datasets/x", "127.0.0.1:0".parse().unwrap());
        config.source_options = BTreeMap::from([("region".to_string(), "us-east-1".to_string())]);
        let err = worker::start(config).await.err().expect("refused").to_string();
        assert!(
            err.contains("missing credentials") && err.contains("access_key_id"),
            "{err}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = WorkerConfig::new(format!("fs://{}", dir.path().display()), "127.0.0.1:0".parse().unwrap());
    config.cache_dir = Some(dir.path().join("cache"));
    let err = worker::start(config).await.err().expect("refused").to_string();
    assert!(err.contains("--cache-size"), "{err}");

    let mut config = WorkerConfig::new(format!("fs://{}", dir.path().display()), "127.0.0.1:0".parse().unwrap());
    config.cache_size = 1 << 30;
    let err = worker::start(config).await.err().expect("refused").to_string();
    assert!(err.contains("without --cache-dir"), "{err}");

    let mut config = WorkerConfig::new(format!("fs://{}", dir.path().display()), "127.0.0.1:0".parse().unwrap());
    config.source_tuning.timeout = std::time::Duration::ZERO;
    let err = worker::start(config).await.err().expect("refused").to_string();
    assert!(err.contains("--source-timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_path_is_not_found_and_the_worker_stays_up() {
    let env = s3_env().await;
    env.put("ds/present.bin", b"here").await;
    let worker = start(env.config("ds")).await;
    let pool = pool(&[&worker], 1);
    match pool.stat("/absent.bin", false).await {
        Err(ClientError::NotFound(message)) => assert!(message.contains("absent.bin"), "{message}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(read_all(&pool, "/present.bin").await.unwrap(), b"here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_permission_denied() {
    let env = s3_env().await;
    env.put("ds/a.bin", b"secret").await;
    let mut config = env.config("ds");
    config.source_options.insert("secret_access_key".into(), "wrong".into());
    let worker = start(config).await;
    let pool = pool(&[&worker], 1);
    match pool.stat("/a.bin", false).await {
        Err(ClientError::PermissionDenied(message)) => assert!(message.contains("credentials"), "{message}"),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_unavailable_and_cached_blocks_still_serve() {
    let env = s3_env().await;
    env.put("ds/cached.bin", &pattern(100_000, 1)).await;
    env.put("ds/cold.bin", &pattern(100_000, 2)).await;
    let worker = start(env.config("ds")).await;
    let pool = pool(&[&worker], 1);
    let cached = pool.stat("/cached.bin", false).await.unwrap();
    let cold = pool.stat("/cold.bin", false).await.unwrap();
    assert!(read_all(&pool, "/cached.bin").await.unwrap() == pattern(100_000, 1));

    env.s3.stop();
    match pool.read_block(&cold, 0, 0, 0).await {
        Err(ClientError::SourceUnavailable(message)) => {
            assert!(message.contains("unreachable"), "{message}")
        }
        other => panic!("expected SourceUnavailable, got {other:?}"),
    }
    let (data, _) = pool
        .read_block(&cached, 0, 0, 0)
        .await
        .expect("cached blocks still serve");
    assert!(data[..] == pattern(100_000, 1)[..BLOCK as usize]);
    assert!(pool.stats().await[0].1.is_ok(), "the worker stays up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_fails_over_to_the_next_owner() {
    let env = s3_env().await;
    env.put("ds/f.bin", &pattern(8 * BLOCK as usize, 4)).await;
    let live = start(env.config("ds")).await;
    // A port nobody listens on: bind one, then close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pool = WorkerPool::new(&[dead.to_string(), live.addr.to_string()], 1).unwrap();
    assert!(read_all(&pool, "/f.bin").await.unwrap() == pattern(8 * BLOCK as usize, 4));
}
