// Records what frpc's transport stack writes on its control connection, for
// tests/test_detect_relays.py: Go's crypto/tls client (frp's NewClientTLSConfig: no ALPN,
// InsecureSkipVerify without a CA, the server address as ServerName) over which
// hashicorp/yamux runs as frp configures it (MaxStreamWindowSize 6 MiB), and on its first
// stream the Login message framed as golib msg/json does ('o', int64 length, JSON of
// msg.Login in struct order). The TLS server is Go's too, with a random self-signed RSA key
// as frps makes one (newRandomTLSKeyPair). frp itself is not packaged for Debian; this uses
// Debian's golang-go and golang-github-hashicorp-yamux-dev, over net.Pipe (no network).
//
// Build and run (GOPATH mode, Debian's Go sources):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go run main.go client.bin
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// tee keeps a copy of every byte the client writes to the connection.
type tee struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (t *tee) Write(p []byte) (int, error) {
	t.mu.Lock()
	t.buf.Write(p)
	t.mu.Unlock()
	return t.Conn.Write(p)
}

// Login is frp's msg.Login (pkg/msg/msg.go), the fields frpc fills in.
type Login struct {
	Version      string            `json:"version,omitempty"`
	Hostname     string            `json:"hostname,omitempty"`
	Os           string            `json:"os,omitempty"`
	Arch         string            `json:"arch,omitempty"`
	User         string            `json:"user,omitempty"`
	PrivilegeKey string            `json:"privilege_key,omitempty"`
	Timestamp    int64             `json:"timestamp,omitempty"`
	RunID        string            `json:"run_id,omitempty"`
	Metas        map[string]string `json:"metas,omitempty"`
	PoolCount    int               `json:"pool_count,omitempty"`
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func main() {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	must(err)
	tmpl := x509.Certificate{SerialNumber: big.NewInt(1)}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	must(err)
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}

	c1, c2 := net.Pipe()
	t := &tee{Conn: c1}
	go func() {
		srv := tls.Server(c2, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		cfg := yamux.DefaultConfig()
		cfg.LogOutput = io.Discard
		sess, err := yamux.Server(srv, cfg)
		must(err)
		st, err := sess.Accept()
		must(err)
		_, _ = io.Copy(io.Discard, st)
	}()

	cl := tls.Client(t, &tls.Config{ServerName: "203.0.113.9", InsecureSkipVerify: true, MinVersion: tls.VersionTLS12})
	cfg := yamux.DefaultConfig()
	cfg.LogOutput = io.Discard
	cfg.MaxStreamWindowSize = 6 * 1024 * 1024
	sess, err := yamux.Client(cl, cfg)
	must(err)
	st, err := sess.OpenStream()
	must(err)
	body, err := json.Marshal(Login{Version: "0.52.3", Os: "linux", Arch: "amd64",
		PrivilegeKey: "5f1c0e6a9d1d4a3c8b1e2f3a4b5c6d7e", Timestamp: time.Now().Unix(), PoolCount: 1})
	must(err)
	msg := []byte{'o'}
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(body)))
	msg = append(append(msg, n[:]...), body...)
	_, err = st.Write(msg)
	must(err)
	time.Sleep(300 * time.Millisecond)
	t.mu.Lock()
	defer t.mu.Unlock()
	must(os.WriteFile(os.Args[1], t.buf.Bytes(), 0o644))
}
