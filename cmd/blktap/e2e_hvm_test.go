package main

// An HVM guest's emulated disk: libxl starts QEMU with a -drive built from
// the backend's physical-device-path (docs/HVM.md), the firmware and the
// guest's early boot read and write through it, then the guest's PV
// drivers unplug it and carry on through the ring. Both paths must see one
// image and no acknowledged write may fall between them. Here QEMU is
// Debian's qemu-system-i386 started the way libxl starts it, minus Xen.

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// libxlDriveFile is the file= value libxl gives QEMU for a disk whose
// backend directory holds physical-device-path pdp, by backend type:
// libxl >= 4.19 wraps it for backendtype=tap (backend/vbd3) as an NBD
// URI; for a disk with a hotplug script (backend/vbd, every version) it
// passes the value through unchanged, so there it must already be a URI
// QEMU can open (libxl_disk.c:libxl__device_disk_find_local_path).
func libxlDriveFile(backendType, pdp string) string {
	if backendType == "vbd3" {
		return "nbd+unix:///?socket=" + pdp
	}
	return pdp
}

// libxlIDEDrive is the -drive argument of libxl_dm.c's
// qemu_disk_ide_drive_string for disk number index (xvda/hda = 0) of a
// backend other than qdisk: format=raw, because the backend already
// presents the guest's view of the image.
func libxlIDEDrive(file string, index int) string {
	return fmt.Sprintf("file=%s,if=ide,index=%d,media=disk,format=raw,cache=writeback", file, index)
}

// physicalDevicePath reads what a device model would read: the backend
// directory's physical-device-path, from the daemon's xenstore ("" when
// the key is absent).
func (d *daemon) physicalDevicePath(xsRead, be string) string {
	d.t.Helper()
	cmd := exec.Command(xsRead, be+"/physical-device-path")
	cmd.Env = append(os.Environ(), "XENSTORED_PATH="+filepath.Join(d.stateDir, "xenstored.sock"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "couldn't read path") {
			return ""
		}
		d.t.Fatalf("xenstore-read %s/physical-device-path: %v %s", be, err, out)
	}
	return strings.TrimSpace(string(out))
}

// ioCounters are the worker's counters that `blktap ls --json` reports.
type ioCounters struct {
	Kind   string `json:"kind"`
	Domain uint32 `json:"domain"`
	Devid  uint32 `json:"devid"`
	Name   string `json:"name"`
	IO     *struct {
		Flushes    uint64 `json:"flushes"`
		NBDFlushes uint64 `json:"nbd_flushes"`
		NBDWrites  uint64 `json:"nbd_writes"`
	} `json:"io"`
}

func (d *daemon) counters(name string) ioCounters {
	d.t.Helper()
	out, err := d.blktap("ls", "--json")
	if err != nil {
		d.t.Fatal(err)
	}
	var rows []ioCounters
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		d.t.Fatalf("ls --json: %v\n%s", err, out)
	}
	for _, r := range rows {
		if r.Name == name {
			if r.IO == nil {
				d.t.Fatalf("%s: ls reports no counters:\n%s", name, out)
			}
			return r
		}
	}
	d.t.Fatalf("%s not in ls:\n%s", name, out)
	return ioCounters{}
}

// qmp is a QEMU monitor connection speaking QMP.
type qmp struct {
	t      *testing.T
	conn   net.Conn
	r      *bufio.Reader
	stdout *syncBuffer
}

func dialQMP(t *testing.T, sock string, exited <-chan error) *qmp {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			q := &qmp{t: t, conn: c, r: bufio.NewReader(c)}
			q.reply(nil) // the greeting
			q.run("qmp_capabilities", nil)
			return q
		}
		select {
		case err := <-exited:
			t.Fatalf("qemu exited before its monitor answered: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu's monitor %s never answered: %v", sock, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// reply reads up to the next non-event message.
func (q *qmp) reply(into any) map[string]json.RawMessage {
	q.t.Helper()
	q.conn.SetReadDeadline(time.Now().Add(2 * time.Minute))
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			q.t.Fatalf("qmp read: %v", err)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(line, &m); err != nil {
			q.t.Fatalf("qmp: %v in %q", err, line)
		}
		if _, ev := m["event"]; ev {
			continue
		}
		if e, bad := m["error"]; bad {
			q.t.Fatalf("qmp error: %s", e)
		}
		if into != nil {
			if err := json.Unmarshal(m["return"], into); err != nil {
				q.t.Fatalf("qmp return %s: %v", m["return"], err)
			}
		}
		return m
	}
}

func (q *qmp) run(cmd string, args any) map[string]json.RawMessage {
	q.t.Helper()
	msg := map[string]any{"execute": cmd}
	if args != nil {
		msg["arguments"] = args
	}
	b, _ := json.Marshal(msg)
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		q.t.Fatalf("qmp %s: %v", cmd, err)
	}
	return q.reply(nil)
}

// hmp runs a human monitor command and returns its output.
func (q *qmp) hmp(line string) string {
	q.t.Helper()
	m := q.run("human-monitor-command", map[string]any{"command-line": line})
	var out string
	json.Unmarshal(m["return"], &out)
	return out
}

// qemuIO runs a qemu-io command on the drive's block backend inside QEMU,
// the layer the emulated IDE disk issues its requests to, and fails on any
// sign that the request did not complete as asked.
func (q *qmp) qemuIO(drive, cmd string) string {
	q.t.Helper()
	out, err := q.tryQemuIO(drive, cmd)
	if err != nil {
		q.t.Fatal(err)
	}
	return out
}

// tryQemuIO is qemuIO reporting a failed request instead of failing the
// test. qemu-io prints on QEMU's stdout, not into the monitor's reply.
func (q *qmp) tryQemuIO(drive, cmd string) (string, error) {
	q.t.Helper()
	from := q.stdout.Len()
	q.hmp(fmt.Sprintf("qemu-io %s %q", drive, cmd))
	want := map[string]string{"write": "wrote ", "read": "read "}[strings.Fields(cmd)[0]]
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := q.stdout.String()[from:]
		if strings.Contains(out, "failed") || strings.Contains(out, "rror") {
			return out, fmt.Errorf("qemu-io %s %q inside QEMU: %s", drive, cmd, out)
		}
		if want == "" || strings.Contains(out, want) {
			return out, nil
		}
		if time.Now().After(deadline) {
			return out, fmt.Errorf("qemu-io %s %q inside QEMU: no %q in %q", drive, cmd, want, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// syncBuffer is QEMU's output, written by exec's copier while the test
// reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (s *syncBuffer) Len() int { return len(s.String()) }

// startDeviceModel starts QEMU as libxl would for an HVM guest with the
// given -drive (and other) arguments, with no Xen: a plain pc machine
// under TCG. Returns the monitor and a kill function.
func startDeviceModel(t *testing.T, qemu string, extra ...string) (*qmp, func()) {
	t.Helper()
	dir, err := os.MkdirTemp("", "bt-dm-") // short: a unix socket path is limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp")
	args := []string{"-machine", "pc", "-accel", "tcg", "-m", "16",
		"-display", "none", "-nodefaults", "-serial", "none", "-monitor", "none",
		"-qmp", "unix:" + sock + ",server=on,wait=off"}
	cmd := exec.Command(qemu, append(args, extra...)...)
	var output syncBuffer
	cmd.Stdout, cmd.Stderr = &output, &output
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	kill := func() {
		if stopped {
			return
		}
		stopped = true
		cmd.Process.Kill()
		<-exited
	}
	t.Cleanup(func() {
		kill()
		if t.Failed() {
			t.Logf("qemu output:\n%s", output.String())
		}
	})
	q := dialQMP(t, sock, exited)
	q.stdout = &output
	t.Cleanup(func() { q.conn.Close() })
	return q, kill
}

// verify runs qemu-io read checks; qemu-io reports a pattern mismatch on
// its output, not always in its exit status.
func verify(t *testing.T, qemuIO string, args ...string) {
	t.Helper()
	if out := runTool(t, qemuIO, args...); strings.Contains(out, "verification failed") {
		t.Fatalf("DATA MISMATCH: qemu-io %s:\n%s", strings.Join(args, " "), out)
	}
}

// hvmDisk creates an image (raw ones with head written at the start, if
// any), attaches it to domain domid, and returns the URI attach printed
// and the -drive argument libxl would build for it as IDE disk index, from
// the backend's physical-device-path as a device model reads it. Without
// Xen only domain-0 disks have an export (the daemon plays the guests'
// frontends); a guest disk's, on Xen, is the harness's hvm scenario.
func (d *daemon) hvmDisk(bin, xsRead string, domid int, img, format, vdev string, head []byte, index int) (uri, drive string) {
	t := d.t
	t.Helper()
	if head != nil && format != "raw" {
		t.Fatalf("hvmDisk writes a head into raw images only, not %s", format)
	}
	if out, err := exec.Command(bin, "image", "create", "-f", format, img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("image create: %v %s", err, out)
	}
	if head != nil {
		f, err := os.OpenFile(img, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.WriteAt(head, 0)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	spec := map[string]string{"raw": "aio:", "qcow2": "qcow2:"}[format] + img
	uri = d.attachURI(strconv.Itoa(domid), spec, vdev, "w")
	row := d.counters(fmt.Sprintf("d%d-%s", domid, vdev))
	be := fmt.Sprintf("/local/domain/0/backend/%s/%d/%d", row.Kind, row.Domain, row.Devid)
	pdp := d.physicalDevicePath(xsRead, be)
	switch {
	case pdp == "":
		t.Fatalf("%s has no physical-device-path", be)
	case domid == 0 && "nbd+unix:///?socket="+pdp != uri:
		t.Fatalf("%s/physical-device-path is %q; attach printed %q", be, pdp, uri)
	}
	return uri, libxlIDEDrive(libxlDriveFile(row.Kind, pdp), index)
}

// hvmDaemon starts a daemon for the HVM tests and finds their tools.
func hvmDaemon(t *testing.T) (d *daemon, bin, qemuSys, xsRead string) {
	qemuSys = oracle.Require(t, "qemu-system-i386")
	xsRead = oracle.Require(t, "xenstore-read")
	bin = buildBinary(t)
	d = startDaemon(t, bin, "")
	d.waitAnswering()
	return d, bin, qemuSys, xsRead
}

// The device model's side of an HVM disk: QEMU reads what we hold, every
// write it acknowledges reaches the image, its flush reaches us, and the
// emulated->PV switch (the unplug, then the ring) loses nothing.
func TestEndToEndHVMDeviceModel(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	qemuImg := oracle.Require(t, "qemu-img")
	d, bin, qemuSys, xsRead := hvmDaemon(t)
	dir := t.TempDir()

	for i, c := range []struct {
		domid  int
		format string
	}{{0, "raw"}, {0, "qcow2"}} {
		fmtName := c.format
		t.Run(fmt.Sprintf("domain%d-%s", c.domid, fmtName), func(t *testing.T) {
			parent := d.t
			d.t = t
			defer func() { d.t = parent }()
			vdev := []string{"xvda", "xvdb", "xvdc"}[i]
			img := filepath.Join(dir, vdev+"."+fmtName)
			name := fmt.Sprintf("d%d-%s", c.domid, vdev)
			uri, ideDrive := d.hvmDisk(bin, xsRead, c.domid, img, fmtName, vdev, nil, i)

			// What the toolstack's side holds before the guest starts (an
			// installer's image, say): the firmware must read it.
			runTool(t, qemuIO, "-f", "raw", uri, "-c", "write -P 0x5b 4M 1M")

			// -S: no guest code runs; the test drives the block layer.
			q, killDM := startDeviceModel(t, qemuSys, "-S", "-drive", ideDrive)
			drive := fmt.Sprintf("ide0-hd%d", i) // QEMU's name for if=ide,index=i
			info := q.hmp("info block " + drive)
			if !strings.Contains(info, "nbd") || !strings.Contains(info, "Cache mode:       writeback") {
				t.Fatalf("QEMU's drive is not the NBD export with a writeback cache:\n%s", info)
			}
			q.qemuIO(drive, "read -P 0x5b 4M 1M")
			q.qemuIO(drive, "read -P 0 0 1M")

			ackAndFlushReachUs(t, d, q, qemuIO, drive, name, uri)

			unplugLosesNothing(t, d, q, qemuIO, drive, name, uri)
			// and writes of its own, as the PV driver does after the unplug
			runTool(t, qemuIO, "-f", "raw", uri, "-c", "write -P 0x77 16M 1M")
			killDM() // as at domain destroy: the model goes, the disk stays

			if _, err := d.blktap("detach", strconv.Itoa(c.domid), vdev); err != nil {
				t.Fatal(err)
			}
			// Detached: the image itself holds every acknowledged write.
			verify(t, qemuIO, "-f", fmtName, "-r", img,
				"-c", "read -P 0xa5 0 1M", "-c", "read -P 0x5b 4M 1M",
				"-c", "read -P 0xc3 8M 2M", "-c", "read -P 0x3c 12M 64k",
				"-c", "read -P 0x77 16M 1M", "-c", "read -P 0 20M 1M")
			if fmtName == "qcow2" {
				runTool(t, qemuImg, "check", "-f", "qcow2", img)
			}
		})
	}
}

// ackAndFlushReachUs: acknowledged means at our worker: a second client
// (the PV path's stand-in, another connection to the same worker) reads
// it at once, with no flush in between; and the guest's cache flush (IDE
// FLUSH CACHE, which cache=writeback passes down) is an NBD flush to us.
func ackAndFlushReachUs(t *testing.T, d *daemon, q *qmp, qemuIO, drive, name, uri string) {
	before := d.counters(name).IO
	q.qemuIO(drive, "write -P 0xa5 0 1M")
	verify(t, qemuIO, "-f", "raw", uri, "-c", "read -P 0xa5 0 1M")
	if got := d.counters(name).IO; got.NBDWrites <= before.NBDWrites {
		t.Fatalf("QEMU's write never reached the export: nbd_writes %d -> %d", before.NBDWrites, got.NBDWrites)
	}
	before = d.counters(name).IO
	q.qemuIO(drive, "flush")
	after := d.counters(name).IO
	if after.NBDFlushes <= before.NBDFlushes || after.Flushes <= before.Flushes {
		t.Fatalf("QEMU's flush did not reach the worker: nbd_flushes %d -> %d, flushes %d -> %d",
			before.NBDFlushes, after.NBDFlushes, before.Flushes, after.Flushes)
	}
}

// unplugLosesNothing: the switch: writes in flight on the emulated disk,
// then the unplug. QEMU's Xen unplug (xen_platform.c) drains, flushes and
// drops the drive's block backend; drive_del is that removal. The other
// path then sees every write the emulated disk made.
func unplugLosesNothing(t *testing.T, d *daemon, q *qmp, qemuIO, drive, name, uri string) {
	q.qemuIO(drive, "aio_write -P 0xc3 8M 2M")
	q.qemuIO(drive, "aio_write -P 0x3c 12M 64k")
	before := d.counters(name).IO
	if out := q.hmp("drive_del " + drive); strings.TrimSpace(out) != "" {
		t.Fatalf("drive_del %s: %s", drive, out)
	}
	after := d.counters(name).IO
	if after.NBDFlushes <= before.NBDFlushes {
		t.Errorf("the unplug closed QEMU's drive without a flush reaching us: nbd_flushes %d -> %d",
			before.NBDFlushes, after.NBDFlushes)
	}
	if info := q.hmp("info block"); strings.Contains(info, drive+" ") {
		t.Fatalf("%s still in QEMU after drive_del:\n%s", drive, info)
	}
	verify(t, qemuIO, "-f", "raw", uri,
		"-c", "read -P 0xa5 0 1M", "-c", "read -P 0x5b 4M 1M",
		"-c", "read -P 0xc3 8M 2M", "-c", "read -P 0x3c 12M 64k")
}

// bootSectorHex is the code of a boot sector (its source is in
// docs/HVM.md): it writes itself to LBA 2 with int 13h and reports on the
// 0xe9 debug port. The rest of the sector is zero up to 0x55aa.
const bootSectorHex = "fa31c08ed88ec08ed0bc007cfbbb007cb80103b90300ba8000cd13be327c7303be497cbae900ac84c07403eeebf8faf4ebfc58542d48564d2d4d42522077726f7465204c4241320a0058542d48564d2d4d425220696e743133207772697465206661696c65640a"

func bootSector(t *testing.T) []byte {
	code, err := hex.DecodeString(bootSectorHex)
	if err != nil {
		t.Fatal(err)
	}
	s := make([]byte, 512)
	copy(s, code)
	s[510], s[511] = 0x55, 0xaa
	return s
}

// An HVM guest's first disk I/O is its firmware's: SeaBIOS reads the boot
// sector through QEMU's emulated IDE disk from our export, and the boot
// sector's BIOS write goes back the same way. Nothing flushes it; it must
// be in the image after the device model is killed and the disk detached.
func TestEndToEndHVMFirmwareBoot(t *testing.T) {
	qemuImg := oracle.Require(t, "qemu-img")
	d, bin, qemuSys, xsRead := hvmDaemon(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "boot.raw")
	mbr := bootSector(t)
	uri, ideDrive := d.hvmDisk(bin, xsRead, 0, img, "raw", "xvda", mbr, 0)
	con := filepath.Join(dir, "debugcon")
	_, killDM := startDeviceModel(t, qemuSys, "-drive", ideDrive, "-debugcon", "file:"+con)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		b, _ := os.ReadFile(con)
		if bytes.Contains(b, []byte("int13 write failed")) {
			t.Fatalf("the boot sector's BIOS write failed: %s", b)
		}
		if bytes.Contains(b, []byte("wrote LBA2")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the firmware never ran the boot sector from our export; debug port: %q", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Through the export, while the model still runs: what it wrote.
	// (qemu-img 7.2's dd refuses skip= with a small count: read 3 sectors.)
	head := filepath.Join(dir, "head")
	runTool(t, qemuImg, "dd", "-f", "raw", "-O", "raw", "if="+uri, "of="+head, "bs=512", "count=3")
	if got, _ := os.ReadFile(head); len(got) != 1536 || !bytes.Equal(got[1024:], mbr) {
		t.Fatalf("DATA MISMATCH: LBA 2 through the export is not the boot sector the guest wrote")
	}
	killDM()
	if _, err := d.blktap("detach", "0", "xvda"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[1024:1536], mbr) {
		t.Fatalf("DATA MISMATCH: the guest's BIOS write is not in the image after detach")
	}
}

// The device model holds its NBD connection for the guest's life. A worker
// crash breaks it: libxl gives QEMU no reconnect-delay, so requests made
// while the worker is down fail (the guest sees EIO on the emulated disk,
// docs/HVM.md), but QEMU reconnects to the same socket path once the
// restarted worker listens, and every write acknowledged before the crash
// is there.
func TestEndToEndHVMWorkerRestart(t *testing.T) {
	d, bin, qemuSys, xsRead := hvmDaemon(t)
	img := filepath.Join(t.TempDir(), "r.raw")
	_, ideDrive := d.hvmDisk(bin, xsRead, 0, img, "raw", "xvda", nil, 0)
	q, _ := startDeviceModel(t, qemuSys, "-S", "-drive", ideDrive)
	q.qemuIO("ide0-hd0", "write -P 0x11 0 1M")
	before, _ := d.row("d0-xvda")
	if err := syscall.Kill(before.WorkerPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitRow("d0-xvda", "restart after SIGKILL", func(r lsRow) bool {
		return r.Phase == "connected" && r.WorkerPid > 0 && r.WorkerPid != before.WorkerPid
	})
	var errs []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := q.tryQemuIO("ide0-hd0", "read -P 0x11 0 1M")
		if err == nil {
			break
		}
		if strings.Contains(err.Error(), "verification failed") {
			t.Fatalf("DATA MISMATCH after the worker's restart: %v", err)
		}
		errs = append(errs, err.Error())
		if time.Now().After(deadline) {
			t.Fatalf("QEMU never reconnected to the restarted worker: %v", errs)
		}
		time.Sleep(200 * time.Millisecond)
	}
	q.qemuIO("ide0-hd0", "write -P 0x22 1M 1M")
	q.qemuIO("ide0-hd0", "read -P 0x22 1M 1M")
	t.Logf("requests failed while the worker restarted: %d", len(errs))
}
