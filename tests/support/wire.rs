//! HTTP/1.1 on the wire: reading one response from a raw socket, decoding a chunked body, a
//! listener that serves each connection in a task of its own, a scripted upstream that answers
//! every request with the same bytes, one that sends a body to a HEAD too, late, and one that
//! sends interim answers, and a client that sends a whole upload before it reads the answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One response as read from a socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The head as sent (status line and headers), without the blank line.
    pub head: String,
    pub body: Vec<u8>,
    /// True when the peer closed (or reset) before the declared body was complete.
    pub cut: bool,
}

impl RawResponse {
    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// Opens a WebSocket tunnel through veer at `addr` for `host`: the stream and the answer to
/// the upgrade request (a 101 when the tunnel is open).
pub async fn open_tunnel(addr: SocketAddr, host: &str) -> (TcpStream, Option<RawResponse>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_response(&mut stream).await;
    (stream, answer)
}

/// Reads one response head and its body: `Content-Length` bytes, a whole chunked body (kept
/// as sent, see [`dechunk`]), or with neither until the peer closes. Gives up after 5 s;
/// `None` when no complete head arrived.
pub async fn read_response(stream: &mut TcpStream) -> Option<RawResponse> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        if !read_more(stream, &mut buf, deadline).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf.split_off(head_end + 4);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut response = RawResponse {
        status,
        head,
        body: Vec::new(),
        cut: false,
    };
    let length = match response.header("content-length") {
        Some(len) => len.parse::<usize>().ok(),
        None if status == 101 || status == 304 || status == 204 => Some(0),
        None => None,
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"));
    loop {
        if length.is_some_and(|len| body.len() >= len) || chunked && chunked_end(&body).is_some() {
            break;
        }
        if !read_more(stream, &mut body, deadline).await {
            response.cut = length.is_some() || chunked;
            break;
        }
    }
    response.body = body;
    Some(response)
}

/// Reads what is there; false on close, reset or deadline.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> bool {
    let mut chunk = [0u8; 16384];
    match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

/// The next request head on `stream` (without its blank line), read into `buf` and taken
/// out of it, bytes after it left in `buf`; `None` once the peer closes, or after 30 s.
pub async fn next_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        if !read_more(stream, buf, deadline).await {
            return None;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The length of the complete chunked body (chunks, last chunk and trailer section) at the
/// start of `data`; `None` while it is incomplete or when it is malformed.
fn chunked_end(data: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line = find(data.get(at..)?, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[at..at + line]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            // Trailer fields, up to the empty line.
            loop {
                let line = find(data.get(at..)?, b"\r\n")?;
                at += line + 2;
                if line == 0 {
                    return Some(at);
                }
            }
        }
        at += size + 2;
    }
}

/// Decodes a complete chunked body; `None` when it is malformed or incomplete.
pub fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return (data.starts_with(b"\r\n")).then_some(out);
        }
        if data.len() < size + 2 || &data[size..size + 2] != b"\r\n" {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// An upstream on `127.0.0.1:0` that reads each request head and answers with `response`,
/// then closes the connection. Stops when the handle is aborted or dropped with the runtime.
pub async fn scripted_upstream(response: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while find(&head, b"\r\n\r\n").is_none() {
                    if !read_more(&mut stream, &mut head, deadline).await {
                        return;
                    }
                }
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// An upstream on `127.0.0.1:0` for one chunked request: reads it whole (head, chunks and
/// trailer section; at most 5 s), hands the bytes over, answers with `response` and closes.
pub async fn chunked_upstream(
    response: &'static [u8],
) -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<Vec<u8>>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut request = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        // The last chunk ("0\r\n") and the empty line that ends the trailer section.
        let complete = |r: &[u8]| {
            find(r, b"\r\n0\r\n").is_some_and(|last| find(&r[last + 2..], b"\r\n\r\n").is_some())
        };
        while !complete(&request) && read_more(&mut stream, &mut request, deadline).await {}
        let _ = tx.send(request);
        let _ = stream.write_all(response).await;
        let _ = stream.shutdown().await;
    });
    (addr, rx, task)
}

/// A listener on `127.0.0.1:0` that hands each connection it accepts to `serve`, in a task of
/// its own. Returns its address; it stops with the test's runtime.
pub async fn each_connection<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// An upstream on `127.0.0.1:0` that answers every request with its path as the body, sends
/// that body after its answer to a HEAD too, in a write of its own 50 ms after the head (as a
/// server whose HEAD is its GET, with Nagle's algorithm holding the body back), and takes the
/// next request on the same connection. Counts the connections it accepted.
pub async fn late_head_body_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let accepted = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&accepted);
    let addr = each_connection(move |mut stream| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = Vec::new();
            while let Some(head) = next_head(&mut stream, &mut buf).await {
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", path.len());
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                if head.starts_with("HEAD ") {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if stream.write_all(path.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, accepted)
}

/// An upstream on `127.0.0.1:0` that answers each request with `interim` interim answers
/// (`103 Early Hints`, 53 KiB each, most of it a long reason phrase) and then `200 ok`, on a
/// kept-alive connection; with `None`, with interim answers and nothing else, as fast as they
/// are taken, until the connection closes.
pub async fn interim_upstream(interim: Option<usize>) -> SocketAddr {
    let hint = format!(
        "HTTP/1.1 103 Early Hints{}\r\nlink: </a.css>; rel=preload\r\n\r\n",
        " again".repeat(9_000)
    );
    each_connection(move |mut stream| {
        let hint = hint.clone();
        async move {
            let mut buf = Vec::new();
            while next_head(&mut stream, &mut buf).await.is_some() {
                let Some(count) = interim else {
                    let hints = hint.repeat(32);
                    while stream.write_all(hints.as_bytes()).await.is_ok() {}
                    return;
                };
                let mut answer = hint.repeat(count).into_bytes();
                answer.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// How [`upload_then_read`] sends its body.
#[derive(Clone, Copy, Debug)]
pub struct Upload {
    /// In chunked framing, 64 KiB a chunk (else as `Content-Length` says, which `head` must).
    pub chunked: bool,
    /// Only once the answer's head has arrived (the answer comes before the body's first byte).
    pub after_answer: bool,
}

/// Sends `head`, then `len` bytes of body in 64 KiB writes (within 20 s), and only then reads
/// the answer to the end of the connection (within 5 s), as clients that write their whole
/// body first do (Python's `requests`): the answer, or the error of the first write that
/// failed (a reset by the server ends the upload so).
pub async fn upload_then_read(
    addr: SocketAddr,
    head: &str,
    len: usize,
    how: Upload,
) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    if how.after_answer {
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte));
            match read.await {
                Ok(Ok(1)) => answer.push(byte[0]),
                _ => return Err(std::io::Error::other("no answer head")),
            }
        }
    }
    let upload = async {
        let piece = vec![b'x'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(piece.len());
            if how.chunked {
                stream.write_all(format!("{n:x}\r\n").as_bytes()).await?;
                stream.write_all(&piece[..n]).await?;
                stream.write_all(b"\r\n").await?;
            } else {
                stream.write_all(&piece[..n]).await?;
            }
            left -= n;
        }
        if how.chunked {
            stream.write_all(b"0\r\n\r\n").await?;
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(20), upload).await {
        Ok(sent) => sent?,
        Err(_) => return Err(std::io::Error::other("upload not sent within 20 s")),
    }
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer));
    match read.await {
        Ok(read) => read?,
        Err(_) => return Err(std::io::Error::other("still open 5 s after the upload")),
    };
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
