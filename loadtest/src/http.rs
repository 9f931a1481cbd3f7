//! A minimal HTTP/1.1 client for the server's side port: keep-alive connections,
//! JSON bodies, `Content-Length` or chunked responses. Enough for `/cert-hash` and
//! the server API without pulling an HTTP client crate into the build.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One keep-alive connection.
#[derive(Debug)]
pub struct HttpConn {
    addr: SocketAddr,
    stream: BufReader<TcpStream>,
    request: Vec<u8>,
}

impl HttpConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to http://{addr}"))?;
        s.set_nodelay(true)?;
        Ok(Self {
            addr,
            stream: BufReader::new(s),
            request: Vec::with_capacity(1024),
        })
    }

    /// Sends one request and reads its response: (status, body).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        json: Option<&str>,
        bearer: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        use std::io::Write;
        self.request.clear();
        let body = json.unwrap_or("");
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\n",
            self.addr
        )?;
        if let Some(k) = bearer {
            write!(self.request, "Authorization: Bearer {k}\r\n")?;
        }
        if json.is_some() {
            write!(
                self.request,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )?;
        }
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(body.as_bytes());
        self.stream.get_mut().write_all(&self.request).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> anyhow::Result<(u16, String)> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            bail!("connection closed before the response");
        }
        let status: u16 = line
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed in the headers");
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                let value = value.trim();
                if name == "content-length" {
                    length = value.parse::<usize>().ok();
                } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.stream.read_line(&mut line).await?;
                let n = usize::from_str_radix(line.trim(), 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                let start = body.len();
                body.resize(start + n + 2, 0);
                self.stream.read_exact(&mut body[start..]).await?;
                body.truncate(start + n);
                if n == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.stream.read_exact(&mut body).await?;
        } else {
            self.stream.read_to_end(&mut body).await?;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// `GET http://addr/path` on a new connection: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    HttpConn::connect(addr)
        .await?
        .request("GET", path, None, None)
        .await
}
