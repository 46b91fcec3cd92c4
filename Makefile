# Build, test and install fasa. `make build && sudo make install`; packagers: `make install DESTDIR=...`.
# install never builds, so that `sudo make install` leaves no root-owned files in target/.

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
SYSTEMD_UNIT_DIR ?= $(PREFIX)/lib/systemd/system
SYSUSERS_DIR ?= $(PREFIX)/lib/sysusers.d
DBUS_SERVICE_DIR ?= $(PREFIX)/share/dbus-1/system-services
# dbus-daemon reads bus policies only from /usr/share/dbus-1/system.d and /etc/dbus-1/system.d,
# and polkit reads actions only from /usr/share/polkit-1/actions: neither follows PREFIX.
DBUS_POLICY_DIR ?= /usr/share/dbus-1/system.d
POLKIT_ACTION_DIR ?= /usr/share/polkit-1/actions

RELEASE := target/release
INSTALLED := \
	$(SBINDIR)/fasad \
	$(BINDIR)/fasactl \
	$(SYSTEMD_UNIT_DIR)/fasad.service \
	$(SYSUSERS_DIR)/fasad.conf \
	$(DBUS_SERVICE_DIR)/dev.fasa.Fasa1.service \
	$(DBUS_POLICY_DIR)/dev.fasa.Fasa1.conf \
	$(POLKIT_ACTION_DIR)/dev.fasa.Fasa1.policy

.PHONY: build test install uninstall

build:
	cargo build --release -p fasad -p fasactl

test:
	scripts/test

install:
	@test -x $(RELEASE)/fasad -a -x $(RELEASE)/fasactl || \
		{ echo "make install: $(RELEASE)/fasad or fasactl is missing: run 'make build' first" >&2; exit 1; }
	install -Dm0755 $(RELEASE)/fasad $(DESTDIR)$(SBINDIR)/fasad
	install -Dm0755 $(RELEASE)/fasactl $(DESTDIR)$(BINDIR)/fasactl
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	sed 's|/usr/local/sbin/fasad|$(SBINDIR)/fasad|' systemd/fasad.service \
		>$(DESTDIR)$(SYSTEMD_UNIT_DIR)/fasad.service
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/fasad.service
	install -Dm0644 systemd/fasad.sysusers $(DESTDIR)$(SYSUSERS_DIR)/fasad.conf
	install -Dm0644 systemd/dev.fasa.Fasa1.service $(DESTDIR)$(DBUS_SERVICE_DIR)/dev.fasa.Fasa1.service
	install -Dm0644 systemd/dev.fasa.Fasa1.conf $(DESTDIR)$(DBUS_POLICY_DIR)/dev.fasa.Fasa1.conf
	install -Dm0644 systemd/dev.fasa.Fasa1.policy $(DESTDIR)$(POLKIT_ACTION_DIR)/dev.fasa.Fasa1.policy
# On a live system (no DESTDIR): create the user now and make systemd see the unit. dbus-daemon
# picks up the new policy by itself. No tmpfiles.d: StateDirectory=/CacheDirectory= make the folders.
ifeq ($(DESTDIR),)
	if command -v systemd-sysusers >/dev/null; then systemd-sysusers $(SYSUSERS_DIR)/fasad.conf; fi
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif

# Leaves the fasa user and /var/lib/fasa, /var/cache/fasa (models) in place.
uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
ifeq ($(DESTDIR),)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif
